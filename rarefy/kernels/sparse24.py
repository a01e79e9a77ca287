"""2:4 semi-structured sparse matmul, optionally over 4-bit quantized values.

Computes ``y = x @ W.T + bias`` for a weight ``W [N, K]`` in which every group
of 4 consecutive input elements ``W[n, 4g:4g+4]`` holds at most 2 non-zeros
(the NVIDIA 2:4 pattern, Mishra et al. 2021), stored compressed.

Layout (rarefy's own; not cuSPARSELt's metadata order)
------------------------------------------------------
K % 4 == 0 and KC = K / 2 is the length of the compressed axis.

values       float ``[N, KC]``: the 2 kept entries of each group, in
             increasing position order (``values[n, 2g]``, ``values[n, 2g+1]``).
             A group with fewer than 2 non-zeros keeps explicit zeros.
indices      uint8 ``[N, ceil(K / 8)]``: the 2-bit in-group position (0..3) of
             every kept entry, as an LSB-first bitstream along the compressed
             axis (4 positions per byte; entry j at bits ``[2j, 2j+2)``).
             Entry j sits at input column ``4 * (j // 2) + position[j]``.
             The two positions of a group must be distinct (compress_24
             guarantees it).

4-bit variant (``scales`` given): ``values`` are uint8 ``[N, ceil(KC / 2)]``,
unsigned 4-bit codes two per byte, low nibble first (``pack_bits(codes, 4)``);
``scales`` float ``[N, ceil(KC / group_size)]`` (``group_size`` even, so a
group's two kept codes share a scale) and optional ``zero_points``
uint8 ``[N, ceil(KC / group_size)]`` (one unpacked code per byte; absent
means 8) group the compressed axis:
``value[n, j] = (code[n, j] - zp[n, j // group_size]) * scales[n, j // group_size]``.

``x`` is float ``[..., K]`` (fp32, fp16 or bf16); ``y`` is ``[..., N]`` in
``x.dtype``; accumulation is fp32.

Kernels
-------
Both read only the compressed weight (half as many values, 2 bits per dense
weight with int4, plus 1 bit per dense weight of positions) and never write a
dense W to memory.
* ``_sparse24_gather_kernel`` (M <= 4, decoding): per weight tile it gathers
  the needed ``x[m, 4 * (j // 2) + pos]`` by index and reduces
  ``sum_j x_gathered * value`` on the CUDA cores: the work is exactly the
  kept products and the traffic is the compressed weight.
* ``_sparse24_dot_kernel`` (larger M): expands each ``[BLOCK_K, BLOCK_N]``
  weight tile to dense in registers (each dense slot selects one of its
  group's 2 kept entries by position) and feeds ``tl.dot``.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton  # stand-ins when triton, an optional extra, is absent

from .matmul_nbits import _dot, _interpreting, dot_code, interpreter_blocks, pack_bits, unpack_bits

GATHER_MAX_M = 4  # decode-sized M gathers; tl.dot tiles need M >= 16 to pay (heuristic, untimed)

# ---------------------------------------------------------------- format


def compress_24(dense: torch.Tensor):
    """``dense [N, K]`` with <= 2 non-zeros per group of 4 -> ``(values [N, K/2], indices uint8 [N, ceil(K/8)])``."""
    if dense.dim() != 2 or dense.shape[1] % 4:
        raise ValueError(f"need a [N, K] weight with K % 4 == 0, got {tuple(dense.shape)}")
    N, K = dense.shape
    groups = dense.reshape(N, K // 4, 4)
    nonzero = groups != 0
    if (nonzero.sum(-1) > 2).any():
        raise ValueError("weight is not 2:4 sparse: some group of 4 has more than 2 non-zeros")
    # keep the non-zeros first, then the lowest zero slots; store in position order
    pos = torch.arange(4, device=dense.device)
    key = (~nonzero).to(torch.int64) * 4 + pos
    keep = key.argsort(dim=-1)[..., :2].sort(dim=-1).values  # [N, K/4, 2]
    values = groups.gather(-1, keep).reshape(N, K // 2)
    indices = pack_bits(keep.reshape(N, K // 2), 2)
    return values.contiguous(), indices


def decompress_24(values: torch.Tensor, indices: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of :func:`compress_24` for float ``values [N, K/2]``: dense ``[N, K]``."""
    N, KC = values.shape
    pos = unpack_bits(indices, 2, KC).long()
    cols = (torch.arange(KC, device=values.device) // 2) * 4 + pos
    return torch.zeros((N, K), dtype=values.dtype, device=values.device).scatter_add_(1, cols, values)


def dequantize_values_int4(values, scales, zero_points, group_size: int, KC: int) -> torch.Tensor:
    """fp32 ``[N, KC]`` kept values from packed 4-bit codes (the 4-bit variant)."""
    codes = unpack_bits(values, 4, KC).float()
    zp = zero_points.float() if zero_points is not None else torch.full_like(scales, 8, dtype=torch.float32)
    zp = zp.repeat_interleave(group_size, dim=1)[:, :KC]
    return (codes - zp) * scales.float().repeat_interleave(group_size, dim=1)[:, :KC]


def _check(x, values, indices, bias, K, scales, zero_points, group_size) -> tuple[int, int]:
    """Validate operands; return (N, KC)."""
    if K <= 0 or K % 4:
        raise ValueError(f"K must be a positive multiple of 4, got {K}")
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, expected K={K}")
    N, KC = values.shape[0], K // 2
    if indices.dtype != torch.uint8 or tuple(indices.shape) != (N, (K + 7) // 8):
        raise ValueError(f"indices must be uint8 {(N, (K + 7) // 8)}, got {indices.dtype} {tuple(indices.shape)}")
    if scales is None:
        if zero_points is not None:
            raise ValueError("zero_points given without scales")
        if not values.is_floating_point() or tuple(values.shape) != (N, KC):
            raise ValueError(f"values must be float {(N, KC)}, got {values.dtype} {tuple(values.shape)}")
    else:
        if group_size is None or group_size <= 0 or group_size % 2:
            raise ValueError(f"4-bit values need a positive even group_size, got {group_size}")
        n_groups = -(-KC // group_size)
        if values.dtype != torch.uint8 or tuple(values.shape) != (N, (KC + 1) // 2):
            raise ValueError(f"4-bit values must be uint8 {(N, (KC + 1) // 2)}, got {values.dtype} {tuple(values.shape)}")
        if tuple(scales.shape) != (N, n_groups):
            raise ValueError(f"scales must be {(N, n_groups)}, got {tuple(scales.shape)}")
        if zero_points is not None and (zero_points.dtype != torch.uint8 or tuple(zero_points.shape) != (N, n_groups)):
            raise ValueError(f"zero_points must be uint8 {(N, n_groups)}, got {zero_points.dtype} {tuple(zero_points.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be {(N,)}, got {tuple(bias.shape)}")
    return N, KC


def sparse24_matmul_reference(x, values, indices, bias, K: int, scales=None, zero_points=None, group_size=None):
    """Pure-torch ``x @ W.T + bias`` in fp32 from the compressed weight, returned in x.dtype."""
    N, KC = _check(x, values, indices, bias, K, scales, zero_points, group_size)
    if scales is not None:
        values = dequantize_values_int4(values, scales, zero_points, group_size, KC)
    w = decompress_24(values.float(), indices, K)
    y = x.reshape(-1, K).float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


# ---------------------------------------------------------------- kernels


@triton.jit
def _load_kept(val_rows, idx_rows, s_rows, zp_rows, j, mask, group_size,
               QUANT: tl.constexpr, HAS_ZP: tl.constexpr):
    """(fp32 value, int32 in-group position) of compressed entries ``j``."""
    pos = (tl.load(idx_rows + j // 4, mask=mask, other=0).to(tl.int32) >> ((j % 4) * 2)) & 3
    if QUANT:
        code = (tl.load(val_rows + j // 2, mask=mask, other=0).to(tl.int32) >> ((j % 2) * 4)) & 15
        g = j // group_size
        scale = tl.load(s_rows + g, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZP:
            zp = tl.load(zp_rows + g, mask=mask, other=0).to(tl.int32)
        else:
            zp = 8
        val = (code - zp).to(tl.float32) * scale
    else:
        val = tl.load(val_rows + j, mask=mask, other=0.0).to(tl.float32)
    return val, pos


@triton.jit
def _sparse24_gather_kernel(
    # pointers
    x_ptr, val_ptr, idx_ptr, s_ptr, zp_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, KC, group_size,
    # strides, in elements
    stride_xm, stride_vn, stride_in, stride_sn, stride_zn, stride_ym,
    # meta-parameters
    QUANT: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_KC)
    m_mask = offs_m < M
    n_mask = offs_n < N
    n64 = offs_n.to(tl.int64)[:, None]  # weight tiles are [BLOCK_N, BLOCK_KC], contiguous along j
    val_rows = val_ptr + n64 * stride_vn
    idx_rows = idx_ptr + n64 * stride_in
    s_rows = s_ptr + n64 * stride_sn
    zp_rows = zp_ptr + n64 * stride_zn
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None, None] * stride_xm  # [BLOCK_M, 1, 1]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, KC, BLOCK_KC):
        j = j0 + offs_j[None, :]
        w_mask = n_mask[:, None] & (j < KC)
        val, pos = _load_kept(val_rows, idx_rows, s_rows, zp_rows, j, w_mask, group_size, QUANT, HAS_ZP)
        # gather only the inputs the kept weights touch: column 4*(j//2) + pos
        col = (j // 2) * 4 + pos
        xg = tl.load(x_rows + col[None, :, :], mask=m_mask[:, None, None] & w_mask[None, :, :], other=0.0)
        acc += tl.sum(xg.to(tl.float32) * val[None, :, :], axis=2)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _sparse24_dot_kernel(
    # pointers
    x_ptr, val_ptr, idx_ptr, s_ptr, zp_ptr, bias_ptr, y_ptr,
    # sizes (M_BUCKET: autotune key only)
    M, N, K, group_size, M_BUCKET,
    # strides, in elements
    stride_xm, stride_vn, stride_in, stride_sn, stride_zn, stride_ym,
    # meta-parameters
    QUANT: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # tile order: bands of GROUP_M tile-rows reuse the same weight columns
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * num_n
    first_m = (pid // band) * GROUP_M
    rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % rows
    pid_n = (pid % band) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    n64 = offs_n.to(tl.int64)[None, :]  # weight tiles are [BLOCK_K, BLOCK_N] (W^T)
    val_rows = val_ptr + n64 * stride_vn
    idx_rows = idx_ptr + n64 * stride_in
    s_rows = s_ptr + n64 * stride_sn
    zp_rows = zp_ptr + n64 * stride_zn
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & (k < K)[None, :], other=0.0)
        kk = k[:, None]
        w_mask = (kk < K) & n_mask[None, :]
        # group g keeps entries 2g and 2g+1: their positions share one index byte
        g = kk // 4
        ibyte = tl.load(idx_rows + g // 2, mask=w_mask, other=0).to(tl.int32) >> ((g % 2) * 4)
        slot = kk % 4
        take0 = (ibyte & 3) == slot
        take1 = ((ibyte >> 2) & 3) == slot
        # dense slot k takes whichever kept entry sits at k % 4 (or is 0)
        if QUANT:
            # the two codes share one byte and (group_size even) one scale
            vbyte = tl.load(val_rows + g, mask=w_mask, other=0).to(tl.int32)
            code = tl.where(take0, vbyte & 15, vbyte >> 4)
            grp = (2 * g) // group_size
            scale = tl.load(s_rows + grp, mask=w_mask, other=0.0).to(tl.float32)
            if HAS_ZP:
                zp = tl.load(zp_rows + grp, mask=w_mask, other=0).to(tl.int32)
            else:
                zp = 8
            w = tl.where(take0 | take1, (code - zp).to(tl.float32) * scale, 0.0)
        else:
            v0 = tl.load(val_rows + 2 * g, mask=w_mask & take0, other=0.0).to(tl.float32)
            v1 = tl.load(val_rows + 2 * g + 1, mask=w_mask & take1, other=0.0).to(tl.float32)
            w = v0 + v1
        acc += _dot(a, w, DOT)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _gather_configs():
    # BLOCK_M (<= GATHER_MAX_M) comes from the launcher; keep BLOCK_N * BLOCK_KC modest for registers
    shapes = [(8, 256, 4), (16, 128, 8), (32, 64, 8), (32, 128, 8), (64, 64, 8), (16, 256, 8)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_KC": bkc}, num_warps=w) for bn, bkc, w in shapes]


def _dot_configs():
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
        (16, 64, 64, 4, 4), (32, 64, 64, 4, 4), (32, 128, 32, 4, 4),
        (64, 64, 32, 4, 3), (64, 128, 32, 8, 3), (128, 128, 32, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


_gather_tuned = triton.autotune(configs=_gather_configs(), key=["N", "KC", "BLOCK_M", "QUANT", "HAS_ZP"])(
    _sparse24_gather_kernel
)
_dot_tuned = triton.autotune(configs=_dot_configs(), key=["M_BUCKET", "N", "K", "QUANT", "HAS_ZP", "DOT"])(
    _sparse24_dot_kernel
)


def sparse24_matmul(x, values, indices, bias, K: int, scales=None, zero_points=None, group_size=None):
    """Triton ``x @ W.T + bias`` from the compressed 2:4 weight (float or
    4-bit values); same contract as :func:`sparse24_matmul_reference`."""
    N, KC = _check(x, values, indices, bias, K, scales, zero_points, group_size)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be fp32, fp16 or bf16, got {x.dtype}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.reshape(*x.shape[:-1], N)
    vals, idx = values.contiguous(), indices.contiguous()
    quant = scales is not None
    sc = scales.contiguous() if quant else vals  # dummy pointers when absent
    zp = zero_points.contiguous() if zero_points is not None else sc
    ptrs = (x2, vals, idx, sc, zp, bias if bias is not None else y, y)
    strides = (x2.stride(0), vals.stride(0), idx.stride(0), sc.stride(0), zp.stride(0), y.stride(0))
    meta = dict(QUANT=quant, HAS_ZP=zero_points is not None, HAS_BIAS=bias is not None)
    gs = group_size if quant else 1

    if M <= GATHER_MAX_M:
        block_m = triton.next_power_of_2(M)

        def grid(cfg):
            return (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, block_m))

        if _interpreting():
            blocks = {"BLOCK_N": min(64, triton.next_power_of_2(N)), "BLOCK_KC": min(128, triton.next_power_of_2(KC))}
            _sparse24_gather_kernel[grid(blocks)](*ptrs, M, N, KC, gs, *strides, **meta, BLOCK_M=block_m, **blocks)
        else:
            _gather_tuned[grid](*ptrs, M, N, KC, gs, *strides, **meta, BLOCK_M=block_m)
    else:

        def grid(cfg):
            return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)

        args = (*ptrs, M, N, K, gs, triton.next_power_of_2(M), *strides)
        if _interpreting():
            blocks = interpreter_blocks(M, N, K)
            _sparse24_dot_kernel[grid(blocks)](*args, **meta, DOT=dot_code(x.dtype), **blocks)
        else:
            _dot_tuned[grid](*args, **meta, DOT=dot_code(x.dtype))
    return y.reshape(*x.shape[:-1], N)
