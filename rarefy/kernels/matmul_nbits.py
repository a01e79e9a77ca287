"""Weight-only dequant-matmul over ONNX Runtime's MatMulNBits layout.

Computes ``y = x @ dequant(W).T + bias`` for a weight ``W [N, K]`` stored as
low-bit codes, the layout of ``com.microsoft::MatMulNBits``, which rarefy uses
as its canonical packed format.

Layout
------
qweight      uint8 ``[N, n_blocks, block_size * bits // 8]``,
             ``n_blocks = ceil(K / block_size)``. Each block's ``block_size``
             unsigned codes form an LSB-first bitstream: code ``i`` occupies
             bits ``[i*bits, (i+1)*bits)`` of the block's bytes, byte 0 bit 0
             first (4-bit: low nibble first; 3-bit codes straddle bytes).
             Every block is whole bytes, so row ``n`` is one bitstream and code
             ``k`` sits at bit ``k*bits`` of ``qweight[n]``. Codes ``k >= K``
             in the last block are padding and never read.
scales       float ``[N, n_blocks]``.
zero_points  optional uint8 ``[N, ceil(n_blocks * bits / 8)]``: the per-block
             integer zero points packed as the same LSB-first bitstream along
             the block axis; absent means ``2 ** (bits - 1)`` (symmetric).

``W[n, k] = (code[n, k] - zp[n, k // block_size]) * scales[n, k // block_size]``

ONNX Runtime's CPU MatMulNBits implements bits 2, 4 and 8 (the tests check this
layout against it); 3-bit weights pack the same way but have no ORT kernel.

``x`` is float ``[..., K]`` (fp32, fp16 or bf16); ``y`` is ``[..., N]`` in
``x.dtype``; accumulation is fp32. ``bits`` is 2, 3, 4 or 8; ``block_size`` is
a power of two >= 16 (per-channel quantization is one block of K rounded up).

Kernel
------
One program per ``(BLOCK_M, BLOCK_N)`` output tile, grouped in bands of
``GROUP_M`` tile-rows so neighbouring programs share weight tiles in L2. Codes
are unpacked from the packed bytes in registers: the dense weight never exists
in global memory. 2-, 4- and 8-bit tiles are loaded as each row's contiguous bytes
(vectorised) and split into codes with ``tl.join``; 3-bit codes, which straddle bytes,
are gathered per code. When a K tile lies inside one quantization block
(``BLOCK_K <= block_size``) the tile is one dot over the integer-valued
``code - zp`` and one scale per output column; otherwise scales and zero
points are gathered per element. ``pack_bits`` / ``unpack_bits`` are the torch
codecs for the bitstream, shared with the other kernel modules.
"""

from __future__ import annotations

import os

import torch

from ._triton import tl, triton  # stand-ins when triton, an optional extra, is absent

SUPPORTED_BITS = (2, 3, 4, 8)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------- bit codecs


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[..., L]`` (each < 2**bits) into an LSB-first
    bitstream along the last axis: uint8 ``[..., ceil(L * bits / 8)]``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    *lead, length = codes.shape
    n_bytes = (length * bits + 7) // 8
    if 8 % bits == 0:
        # whole codes per byte: stay in uint8 (weights can be large)
        per = 8 // bits
        c = codes.to(torch.uint8) & ((1 << bits) - 1)
        if length % per:
            c = torch.nn.functional.pad(c, (0, per - length % per))
        c = c.reshape(*lead, n_bytes, per)
        out = c[..., 0].clone()
        for i in range(1, per):
            out |= c[..., i] << (bits * i)
        return out
    # otherwise 8 codes of `bits` bits fill exactly `bits` bytes (<= 56 bits in an int64)
    c = codes.to(torch.int64) & ((1 << bits) - 1)
    if length % 8:
        c = torch.nn.functional.pad(c, (0, 8 - length % 8))
    groups = c.reshape(*lead, -1, 8)
    word = (groups << (torch.arange(8, device=codes.device) * bits)).sum(-1, keepdim=True)
    out = ((word >> (torch.arange(bits, device=codes.device) * 8)) & 0xFF).to(torch.uint8)
    return out.reshape(*lead, -1)[..., :n_bytes].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes of each
    LSB-first bitstream in uint8 ``[..., n_bytes]``, as uint8 ``[..., count]``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if packed.shape[-1] * 8 < count * bits:
        raise ValueError(f"{packed.shape[-1]} bytes cannot hold {count} {bits}-bit codes")
    *lead, n_bytes = packed.shape
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        codes = (packed.to(torch.uint8)[..., None] >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*lead, -1)[..., :count].contiguous()
    data = packed.to(torch.int64)
    if n_bytes % bits:
        data = torch.nn.functional.pad(data, (0, bits - n_bytes % bits))
    groups = data.reshape(*lead, -1, bits)  # `bits` bytes hold 8 codes
    word = (groups << (torch.arange(bits, device=packed.device) * 8)).sum(-1, keepdim=True)
    codes = (word >> (torch.arange(8, device=packed.device) * bits)) & ((1 << bits) - 1)
    return codes.reshape(*lead, -1)[..., :count].to(torch.uint8)


# ---------------------------------------------------------------- reference


def _check(x, qweight, scales, zero_points, bias, K, N, bits, block_size) -> int:
    """Validate the MatMulNBits operands; return n_blocks."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    n_blocks = -(-K // block_size)
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, expected K={K}")
    if qweight.dtype != torch.uint8 or tuple(qweight.shape) != (N, n_blocks, block_size * bits // 8):
        raise ValueError(
            f"qweight must be uint8 {(N, n_blocks, block_size * bits // 8)}, "
            f"got {qweight.dtype} {tuple(qweight.shape)}"
        )
    if tuple(scales.shape) != (N, n_blocks):
        raise ValueError(f"scales must be {(N, n_blocks)}, got {tuple(scales.shape)}")
    if zero_points is not None and (
        zero_points.dtype != torch.uint8
        or tuple(zero_points.shape) != (N, (n_blocks * bits + 7) // 8)
    ):
        raise ValueError(
            f"zero_points must be uint8 {(N, (n_blocks * bits + 7) // 8)}, "
            f"got {zero_points.dtype} {tuple(zero_points.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be {(N,)}, got {tuple(bias.shape)}")
    return n_blocks


def dequantize_nbits(qweight, scales, zero_points, K: int, N: int, bits: int, block_size: int):
    """The dense fp32 weight ``[N, K]`` that a MatMulNBits layout encodes."""
    n_blocks = -(-K // block_size)
    codes = unpack_bits(qweight.reshape(N, -1), bits, n_blocks * block_size)[:, :K]
    if zero_points is None:
        zp = torch.full((N, n_blocks), float(1 << (bits - 1)), device=qweight.device)
    else:
        zp = unpack_bits(zero_points, bits, n_blocks).float()
    zp = zp.repeat_interleave(block_size, dim=1)[:, :K]
    scale = scales.float().repeat_interleave(block_size, dim=1)[:, :K]
    return (codes.float() - zp) * scale


def embedding_nbits_reference(ids, qweight, scales, zero_points, K: int, N: int, bits: int, block_size: int):
    """Rows ``ids`` of the [N, K] table a MatMulNBits layout encodes: ``[*ids.shape, K]`` in scales' dtype.
    Only the gathered rows are dequantized."""
    flat = ids.reshape(-1)
    rows = dequantize_nbits(qweight[flat], scales[flat], None if zero_points is None else zero_points[flat],
                            K, flat.numel(), bits, block_size)
    return rows.to(scales.dtype).reshape(*ids.shape, K)


def matmul_nbits_reference(x, qweight, scales, zero_points, bias, K: int, N: int, bits: int, block_size: int):
    """Pure-torch ``x @ dequant(W).T + bias`` in fp32, returned in x.dtype."""
    _check(x, qweight, scales, zero_points, bias, K, N, bits, block_size)
    w = dequantize_nbits(qweight, scales, zero_points, K, N, bits, block_size)
    y = x.reshape(-1, K).float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


# ---------------------------------------------------------------- kernel


@triton.jit
def _extract(ptrs, shift, mask, BITS: tl.constexpr):
    """int32 codes that start ``shift`` bits into the bytes at ``ptrs``."""
    word = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
    if 8 % BITS != 0:
        # 3-bit codes may straddle two bytes; the next byte is read only then,
        # and it is inside the block because blocks are whole bytes
        nxt = tl.load(ptrs + 1, mask=mask & (shift > 8 - BITS), other=0).to(tl.int32)
        word = word | (nxt << 8)
    return (word >> shift) & ((1 << BITS) - 1)


@triton.jit
def _unpack(rows, idx, mask, BITS: tl.constexpr):
    """int32 codes at positions ``idx`` of the LSB-first bitstreams at ``rows``."""
    bit = idx * BITS
    return _extract(rows + bit // 8, bit % 8, mask, BITS)


@triton.jit
def _unpack_tile(b, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 bytes ``[BLOCK_N, BLOCK_K * BITS / 8]`` of 8-, 4- or 2-bit codes -> codes ``[BLOCK_K, BLOCK_N]``.

    ``tl.join`` puts its operands side by side on a new last axis, so joining the low and high
    nibbles of each byte and flattening gives codes in bitstream order (for 2 bits, the inner
    joins pair codes 0/2 and 1/3 so that the outer join interleaves them as 0, 1, 2, 3)."""
    if BITS == 8:
        codes = b
    elif BITS == 4:
        codes = tl.reshape(tl.join(b & 15, b >> 4), (BLOCK_N, BLOCK_K))
    else:
        lo = tl.join(b & 3, (b >> 4) & 3)
        hi = tl.join((b >> 2) & 3, b >> 6)
        codes = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
    return tl.trans(codes)


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """fp32-accumulating dot in the operand type picked by the launcher."""
    if DOT == 1:
        out = tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif DOT == 2:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return out


@triton.jit
def _matmul_nbits_kernel(
    # pointers
    x_ptr, qw_ptr, s_ptr, zp_ptr, bias_ptr, y_ptr,
    # sizes (QW/ZP_ROW_BYTES: bytes per row of the packed streams; M_BUCKET: autotune key only)
    M, N, K, QW_ROW_BYTES, ZP_ROW_BYTES, M_BUCKET,
    # strides, in elements
    stride_xm, stride_sn, stride_ym,
    # meta-parameters
    BITS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_ZP: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
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
    n64 = offs_n.to(tl.int64)[None, :]
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    s_rows = s_ptr + n64 * stride_sn  # [1, BLOCK_N]
    zp_rows = zp_ptr + n64 * ZP_ROW_BYTES
    # BLOCK_K * BITS is a whole number of bytes, so each code's byte offset
    # within a tile and its bit shift are the same in every tile
    if 8 % BITS == 0:
        # whole codes per byte: load each row's tile bytes contiguously ([BLOCK_N, TILE_BYTES],
        # vectorised) and unpack in registers
        TILE_BYTES: tl.constexpr = BLOCK_K * BITS // 8
        offs_b = tl.arange(0, TILE_BYTES)
        qw_ptrs = qw_ptr + offs_n.to(tl.int64)[:, None] * QW_ROW_BYTES + offs_b[None, :]
    else:
        kbit = offs_k[:, None] * BITS
        qw_ptrs = qw_ptr + n64 * QW_ROW_BYTES + kbit // 8  # [BLOCK_K, BLOCK_N]
        shift = kbit % 8

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k0 + offs_k < K
        # x tile; padding columns are 0, so padded codes contribute nothing
        a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        if 8 % BITS == 0:
            # bytes past K inside the last block are padding codes: readable, and x is 0 there
            b_mask = n_mask[:, None] & ((k0 * BITS // 8 + offs_b) < QW_ROW_BYTES)[None, :]
            codes = _unpack_tile(tl.load(qw_ptrs, mask=b_mask, other=0).to(tl.int32), BITS, BLOCK_N, BLOCK_K)
        else:
            codes = _extract(qw_ptrs, shift, w_mask, BITS)  # [BLOCK_K, BLOCK_N]
        if BLOCK_K <= BLOCK_SIZE:
            # the tile is inside one block: sum_k x (c - z) s = s * sum_k x (c - z)
            blk = tl.zeros((1, BLOCK_N), dtype=tl.int32) + k0 // BLOCK_SIZE
            scale = tl.load(s_rows + blk, mask=n_mask[None, :], other=0.0).to(tl.float32)
            if HAS_ZP:
                zp = _unpack(zp_rows, blk, n_mask[None, :], BITS)
            else:
                zp = 1 << (BITS - 1)
            acc += _dot(a, (codes - zp).to(tl.float32), DOT) * scale
        else:
            # several blocks per tile: dequantize each element
            blk = (k0 + offs_k[:, None]) // BLOCK_SIZE
            scale = tl.load(s_rows + blk, mask=w_mask, other=0.0).to(tl.float32)
            if HAS_ZP:
                zp = _unpack(zp_rows, blk, w_mask, BITS)
            else:
                zp = 1 << (BITS - 1)
            acc += _dot(a, (codes - zp).to(tl.float32) * scale, DOT)
        x_ptrs += BLOCK_K
        qw_ptrs += BLOCK_K * BITS // 8

    # epilogue: bias in fp32, one rounding to the output dtype
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _gpu_configs():
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
        (16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4),
        (32, 64, 128, 4, 4), (64, 64, 64, 4, 3), (64, 128, 64, 4, 4), (64, 128, 128, 8, 3),
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 32, 8, 3), (64, 256, 32, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


_matmul_nbits_tuned = triton.autotune(
    configs=_gpu_configs(), key=["M_BUCKET", "N", "K", "BITS", "BLOCK_SIZE", "HAS_ZP", "DOT"]
)(_matmul_nbits_kernel)


def dot_code(dtype: torch.dtype) -> int:
    """Operand type of the in-kernel dot for activations of ``dtype``: 1 fp16,
    2 bf16 (fp32 under the interpreter, whose bf16 dot is wrong), 0 fp32."""
    if dtype == torch.float16:
        return 1
    if dtype == torch.bfloat16 and not _interpreting():
        return 2
    return 0


def interpreter_blocks(M: int, N: int, K: int) -> dict:
    """One large-block configuration: the interpreter pays per program instance."""
    p2 = triton.next_power_of_2
    return {
        "BLOCK_M": max(16, min(64, p2(M))),
        "BLOCK_N": max(16, min(128, p2(N))),
        "BLOCK_K": max(16, min(128, p2(K))),
        "GROUP_M": 8,
    }


def matmul_nbits(x, qweight, scales, zero_points, bias, K: int, N: int, bits: int, block_size: int):
    """Triton ``x @ dequant(W).T + bias``; same contract as :func:`matmul_nbits_reference`."""
    _check(x, qweight, scales, zero_points, bias, K, N, bits, block_size)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be fp32, fp16 or bf16, got {x.dtype}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.reshape(*x.shape[:-1], N)
    qw = qweight.contiguous()
    sc = scales if scales.stride(-1) == 1 else scales.contiguous()
    zp = zero_points.contiguous() if zero_points is not None else qw  # dummy pointer when absent
    args = (
        x2, qw, sc, zp, bias if bias is not None else y, y,
        M, N, K, qw.shape[1] * qw.shape[2], zp.shape[-1], triton.next_power_of_2(M),
        x2.stride(0), sc.stride(0), y.stride(0),
    )
    meta = dict(
        BITS=bits, BLOCK_SIZE=block_size, HAS_ZP=zero_points is not None,
        HAS_BIAS=bias is not None, DOT=dot_code(x.dtype),
    )

    def grid(cfg):
        return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)

    if _interpreting():
        blocks = interpreter_blocks(M, N, K)
        _matmul_nbits_kernel[grid(blocks)](*args, **meta, **blocks)
    else:
        _matmul_nbits_tuned[grid](*args, **meta)
    return y.reshape(*x.shape[:-1], N)
