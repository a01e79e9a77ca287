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


# -- sparse linears (passes/sparsity.py) -------------------------------------------------------
# rarefy::linear_sparse24(x, values, indices, bias, K): 2:4 sparse weight compressed as in
# rarefy.kernels.sparse24 (values [N, K/2], 2-bit in-group positions uint8 [N, K/8]).
# rarefy::linear_masked(x, values, mask, bias, N, K): any sparse weight as kept values [nnz]
# plus a 1-bit mask uint8 [N, ceil(K/8)], as in rarefy.kernels.bitmask.
@torch.library.custom_op("rarefy::linear_sparse24", mutates_args=())
def linear_sparse24(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], K: int) -> Tensor:
    from rarefy.kernels.sparse24 import sparse24_matmul_reference

    return sparse24_matmul_reference(x, values, indices, bias, K)


@linear_sparse24.register_fake
def _linear_sparse24_fake(x, values, indices, bias, K):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


@torch.library.custom_op("rarefy::linear_masked", mutates_args=())
def linear_masked(x: Tensor, values: Tensor, mask: Tensor, bias: Optional[Tensor], N: int, K: int) -> Tensor:
    from rarefy.kernels.bitmask import masked_linear_reference

    return masked_linear_reference(x, values, mask, bias, N, K)


@linear_masked.register_fake
def _linear_masked_fake(x, values, mask, bias, N, K):
    return x.new_empty((*x.shape[:-1], N))
