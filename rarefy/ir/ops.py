"""The rarefy dialect: custom torch ops that passes create and backends lower.

Each op is a ``torch.library.custom_op`` with a pure-torch reference implementation (the
math lives beside its Triton kernel in ``rarefy.kernels`` and is imported lazily, so that
``import rarefy`` does not import Triton) and a fake implementation, so a rewritten graph
exports again with dynamic shapes. Backends map each op: ``backends/onnx_lowering.py``
onto ONNX Runtime operators, ``backends/triton.py`` onto kernels.

Ops:
* ``rarefy::matmul_nbits(x, qweight, scales, zero_points, bias, K, N, bits, block_size)`` —
  weight-only quantized linear, ``y = x @ dequant(W).T + bias``. The packed layout is
  ONNX Runtime's ``com.microsoft::MatMulNBits``: ``qweight`` uint8 ``[N, n_blocks,
  block_size*bits/8]`` (codes as an LSB-first bitstream per block), ``scales`` ``[N,
  n_blocks]``, ``zero_points`` None (symmetric, zero point ``2**(bits-1)``) or uint8 ``[N,
  ceil(n_blocks*bits/8)]`` packed the same way. ``W[n,k] = (code - zp) * scale`` per block.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


@torch.library.custom_op("rarefy::matmul_nbits", mutates_args=())
def matmul_nbits(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zero_points: Optional[Tensor],
    bias: Optional[Tensor],
    K: int,
    N: int,
    bits: int,
    block_size: int,
) -> Tensor:
    from rarefy.kernels.matmul_nbits import matmul_nbits_reference

    return matmul_nbits_reference(x, qweight, scales, zero_points, bias, K, N, bits, block_size)


@matmul_nbits.register_fake
def _matmul_nbits_fake(x, qweight, scales, zero_points, bias, K, N, bits, block_size):
    return x.new_empty((*x.shape[:-1], N))


def is_rarefy_op(target) -> bool:
    """True for a call target in the rarefy dialect (any overload of torch.ops.rarefy.*)."""
    return getattr(target, "namespace", None) == "rarefy"
