"""W8A8 linear: dynamic per-token int8 activations times per-channel int8 weights.

``y = (x_q @ w_q.T) * x_scale[:, None] * w_scale[None, :] + bias`` with the
product accumulated exactly in int32 (SmoothQuant's W8A8 / LLM.int8()'s
vector-wise scheme without outliers).

Shapes and layout
-----------------
x        float ``[..., K]`` (fp32, fp16 or bf16), flattened to ``[M, K]``.
x_q      int8 ``[M, K]``; ``x_scale`` fp32 ``[M]``: symmetric, per token,
         ``x_scale = absmax(x[m]) / 127`` (1 for an all-zero row),
         ``x_q = clamp(round(x / x_scale), -127, 127)``, rounding half away
         from zero (the kernel and the reference round identically).
w_q      int8 ``[N, K]`` row-major (the nn.Linear layout); ``w_scale`` fp32
         ``[N]``. ``quantize_per_token_reference`` applied to a weight gives
         this symmetric per-output-channel quantization.
bias     optional float ``[N]``.
y        fp32 ``[M, N]`` from ``int8_matmul``; ``w8a8_linear`` returns
         ``[..., N]`` in x's dtype.

Kernels
-------
``_quantize_per_token_kernel``: one program per row, two passes over K
(absmax, then quantize), fp32 arithmetic. ``_int8_matmul_kernel``: tiled
int8 x int8 -> int32 ``tl.dot`` (tensor-core IMMA on GPUs), grouped tile order
for L2 reuse, scales and bias applied once in the fp32 epilogue.
``w8a8_linear`` launches both (two launches; the activation is read once more
from L2 instead of recomputing row absmax in every output-column tile).

Per-tensor variant (``w8a8_tensor_linear``): ONNX ``DynamicQuantizeLinear`` semantics, one
asymmetric uint8 scale and zero point for the whole activation (ONNX Runtime's fused
``DynamicQuantizeMatMul``). The kernel path shifts the uint8 codes by -128 into int8,
runs the same ``_int8_matmul_kernel`` and adds ``(128 - zp) * colsum(w_q)`` back in the
epilogue vector, so no second GEMM kernel is needed.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton  # stand-ins when triton, an optional extra, is absent

from .matmul_nbits import _interpreting

# ---------------------------------------------------------------- references


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v >= 0, torch.floor(v + 0.5), -torch.floor(0.5 - v))


def quantize_per_token_reference(x: torch.Tensor):
    """Symmetric per-row int8: ``(x_q int8 [..., K], x_scale fp32 [...])``."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = _round_half_away(xf / scale[..., None]).clamp(-127, 127)
    return q.to(torch.int8), scale


def int8_matmul_reference(x_q, x_scale, w_q, w_scale, bias=None):
    """fp32 ``(x_q @ w_q.T) * x_scale[:, None] * w_scale[None, :] + bias``."""
    _check_matmul(x_q, x_scale, w_q, w_scale, bias)
    # fp64 holds every int32 partial sum exactly (|acc| < 2**53)
    acc = (x_q.double() @ w_q.double().T).float()
    y = acc * x_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y


def w8a8_linear_reference(x, w_q, w_scale, bias=None):
    """Quantize ``x`` per token, int8 matmul, return ``[..., N]`` in x.dtype."""
    K = x.shape[-1]
    x_q, x_scale = quantize_per_token_reference(x.reshape(-1, K))
    y = int8_matmul_reference(x_q, x_scale, w_q, w_scale, bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], w_q.shape[0])


def quantize_per_tensor_reference(x: torch.Tensor):
    """ONNX ``DynamicQuantizeLinear``: ``(codes int32 [...] in 0..255, scale fp32 [], zero_point int32 [])``.

    ``scale = (max(x, 0) - min(x, 0)) / 255``, ``zero_point = round(-min(x, 0) / scale)``,
    ``codes = clamp(round(x / scale) + zero_point, 0, 255)``; rounding half to even.
    """
    xf = x.float()
    lo = xf.min().clamp(max=0) if xf.numel() else xf.new_zeros(())
    hi = xf.max().clamp(min=0) if xf.numel() else xf.new_zeros(())
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, 255)  # torch.round rounds half to even, as ONNX does
    codes = (torch.round(xf / scale) + zero).clamp(0, 255)
    return codes.to(torch.int32), scale, zero.to(torch.int32)


def w8a8_tensor_linear_reference(x, w_q, w_scale, bias=None):
    """``x`` quantized per tensor (asymmetric uint8), times int8 ``w_q [N, K]``; ``[..., N]`` in x.dtype."""
    K = x.shape[-1]
    codes, scale, zero = quantize_per_tensor_reference(x.reshape(-1, K))
    acc = ((codes - zero).double() @ w_q.double().T).float()  # exact: every partial sum is an int32
    y = acc * scale * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], w_q.shape[0])


def _check_matmul(x_q, x_scale, w_q, w_scale, bias):
    if x_q.dtype != torch.int8 or w_q.dtype != torch.int8:
        raise TypeError(f"x_q and w_q must be int8, got {x_q.dtype} and {w_q.dtype}")
    if x_q.dim() != 2 or w_q.dim() != 2 or x_q.shape[1] != w_q.shape[1]:
        raise ValueError(f"need x_q [M, K] and w_q [N, K], got {tuple(x_q.shape)} and {tuple(w_q.shape)}")
    M, N = x_q.shape[0], w_q.shape[0]
    if tuple(x_scale.shape) != (M,) or tuple(w_scale.shape) != (N,):
        raise ValueError(f"need x_scale [{M}] and w_scale [{N}], got {tuple(x_scale.shape)} and {tuple(w_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")


# ---------------------------------------------------------------- kernels


@triton.jit
def _quantize_per_token_kernel(
    # pointers
    x_ptr, q_ptr, s_ptr,
    # sizes
    K,
    # strides, in elements
    stride_xm, stride_qm,
    # meta-parameters
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm

    # pass 1: row absmax (lane-wise max, then one reduction)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    absmax = tl.max(amax, axis=0)
    scale = tl.where(absmax > 0, absmax / 127.0, 1.0)

    # pass 2: quantize; the re-read row is L2-resident
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        v = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32) / scale
        q = tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(0.5 - v))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_row + k0 + offs, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _int8_matmul_kernel(
    # pointers
    xq_ptr, xs_ptr, wq_ptr, ws_ptr, bias_ptr, y_ptr,
    # sizes (M_BUCKET: autotune key only)
    M, N, K, M_BUCKET,
    # strides, in elements
    stride_xm, stride_wn, stride_ym,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
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
    # wrap out-of-range rows/columns onto valid ones so the main loop only
    # masks K; their results are dropped by the masked store
    rows_a = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
    rows_b = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    a_ptrs = xq_ptr + rows_a.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    b_ptrs = wq_ptr + rows_b.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]  # W^T tile

    # main loop: exact int32 accumulation
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k0 + offs_k < K
        a = tl.load(a_ptrs, mask=k_mask[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_mask[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    # epilogue: dequantize once per output element
    m_mask = offs_m < M
    n_mask = offs_n < N
    xs = tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y, mask=m_mask[:, None] & n_mask[None, :])


def _gpu_configs():
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
        (16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


_int8_matmul_tuned = triton.autotune(configs=_gpu_configs(), key=["M_BUCKET", "N", "K"])(_int8_matmul_kernel)


# ---------------------------------------------------------------- launchers


def quantize_per_token(x: torch.Tensor):
    """Triton per-token quantization; same contract as the reference."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be fp32, fp16 or bf16, got {x.dtype}")
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    x_q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    x_scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M and K:
        block_k = min(triton.next_power_of_2(K), 256 if _interpreting() else 4096)
        warps = 1 if _interpreting() else max(1, min(16, block_k // 256))
        _quantize_per_token_kernel[(M,)](
            x2, x_q, x_scale, K, x2.stride(0), x_q.stride(0), BLOCK_K=block_k, num_warps=warps
        )
    return x_q.reshape(x.shape), x_scale.reshape(x.shape[:-1])


def int8_matmul(x_q, x_scale, w_q, w_scale, bias=None):
    """Triton W8A8 matmul: fp32 ``[M, N]``; same contract as the reference."""
    _check_matmul(x_q, x_scale, w_q, w_scale, bias)
    M, K = x_q.shape
    N = w_q.shape[0]
    x_q = x_q if x_q.stride(-1) == 1 else x_q.contiguous()
    w_q = w_q if w_q.stride(-1) == 1 else w_q.contiguous()
    x_scale = x_scale.float().contiguous()
    w_scale = w_scale.float().contiguous()
    y = torch.empty((M, N), dtype=torch.float32, device=x_q.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_() + (bias.float() if bias is not None else 0.0)
    args = (
        x_q, x_scale, w_q, w_scale, bias if bias is not None else y, y,
        M, N, K, triton.next_power_of_2(M), x_q.stride(0), w_q.stride(0), y.stride(0),
    )

    def grid(cfg):
        return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)

    if _interpreting():
        p2 = triton.next_power_of_2
        blocks = {
            "BLOCK_M": max(16, min(64, p2(M))), "BLOCK_N": max(16, min(128, p2(N))),
            "BLOCK_K": max(16, min(128, p2(K))), "GROUP_M": 8,
        }
        _int8_matmul_kernel[grid(blocks)](*args, HAS_BIAS=bias is not None, **blocks)
    else:
        _int8_matmul_tuned[grid](*args, HAS_BIAS=bias is not None)
    return y


def w8a8_linear(x, w_q, w_scale, bias=None):
    """Quantize ``x [..., K]`` per token and multiply by int8 ``w_q [N, K]``;
    returns ``[..., N]`` in x's dtype."""
    K = x.shape[-1]
    x_q, x_scale = quantize_per_token(x.reshape(-1, K))
    y = int8_matmul(x_q, x_scale, w_q, w_scale, bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], w_q.shape[0])


def w8a8_tensor_linear(x, w_q, w_scale, bias=None):
    """Per-tensor uint8 activations (``DynamicQuantizeLinear``) times int8 ``w_q [N, K]`` on the
    int8 kernel: codes shifted to ``codes - 128`` (int8), the shift added back per column."""
    K = x.shape[-1]
    codes, scale, zero = quantize_per_tensor_reference(x.reshape(-1, K))
    x_q = (codes - 128).to(torch.int8)
    x_scale = scale.expand(x_q.shape[0]).contiguous()
    correction = (128 - zero).float() * w_q.float().sum(1)  # (128 - zp) * colsum(w), in units of the codes
    shift = correction * scale * w_scale.float()
    y = int8_matmul(x_q, x_scale, w_q, w_scale, shift + (bias.float() if bias is not None else 0.0))
    return y.to(x.dtype).reshape(*x.shape[:-1], w_q.shape[0])
