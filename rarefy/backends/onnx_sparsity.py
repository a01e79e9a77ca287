"""ONNX lowering of the sparse linears (``rarefy::linear_sparse24``, ``rarefy::linear_masked``).

ONNX Runtime has no sparse GEMM on CPU, so the artifact stores the compressed weight
(kept values plus 2-bit positions or a 1-bit mask) and rebuilds the dense weight inside
the graph with standard ONNX operators before a plain ``MatMul``:

* 2:4: the positions are unpacked with ``BitShift`` / ``BitwiseAnd``, turned into column
  indices ``4 * (j // 2) + pos`` and ``ScatterElements`` places the values in a zero row.
* bitmask: the mask bits are unpacked the same way and ``ScatterND`` writes the values at
  ``NonZero(mask)``.

The file keeps the compressed tensors (the expansion starts from a ``ConstantOfShape``,
which the exporter's optimizer does not fold); ONNX Runtime's own constant folding (graph
optimisations on) may build the dense weight once at session creation. Either way the
multiply is dense: no speedup is to be expected on this backend.
"""
from __future__ import annotations

import numpy as np
import torch

from .onnx_lowering import onnx_translation


def _unpack_bits(packed, bits: int, count: int):
    """uint8 ``[rows, n_bytes]`` LSB-first bitstream -> int64 ``[rows, count]`` codes."""
    from onnxscript import opset18 as op

    per_byte = 8 // bits
    # OR with zeros from ConstantOfShape, which the exporter's optimizer never folds: otherwise
    # it folds small expansions into int64 index constants larger than the dense weight
    zeros = op.ConstantOfShape(op.Shape(packed), value=_tensor(np.array([0], dtype=np.uint8)))
    packed = op.BitwiseOr(packed, zeros)
    shifts = op.Constant(value=_tensor(np.arange(per_byte, dtype=np.uint8) * bits))
    lanes = op.BitShift(op.Unsqueeze(packed, op.Constant(value_ints=[-1])), shifts, direction="RIGHT")
    codes = op.BitwiseAnd(lanes, op.Constant(value=_tensor(np.array((1 << bits) - 1, dtype=np.uint8))))
    flat = op.Reshape(codes, op.Constant(value_ints=[0, -1]))  # 0: keep the row count
    flat = op.Slice(flat, op.Constant(value_ints=[0]), op.Constant(value_ints=[count]),
                    op.Constant(value_ints=[1]))
    return op.Cast(flat, to=7)  # INT64


def _tensor(array: np.ndarray):
    import onnx

    return onnx.numpy_helper.from_array(array)


def _linear(x, dense, bias):
    from onnxscript import opset18 as op

    y = op.MatMul(x, op.Transpose(dense, perm=[1, 0]))
    return op.Add(y, bias) if bias is not None else y


@onnx_translation(torch.ops.rarefy.linear_sparse24.default)
def _linear_sparse24(x, values, indices, bias, K):
    from onnxscript import opset18 as op

    positions = _unpack_bits(indices, 2, K // 2)
    base = op.Constant(value=_tensor((np.arange(K // 2, dtype=np.int64) // 2) * 4))
    columns = op.Add(positions, base)  # entry j sits at column 4 * (j // 2) + pos[j]
    zeros = op.CastLike(op.ConstantOfShape(op.Mul(op.Shape(values), op.Constant(value_ints=[1, 2]))), values)
    dense = op.ScatterElements(zeros, columns, values, axis=1)  # [N, K]
    return _linear(x, dense, bias)


@onnx_translation(torch.ops.rarefy.linear_masked.default)
def _linear_masked(x, values, mask, bias, N, K):
    from onnxscript import opset18 as op

    keep = _unpack_bits(mask, 1, K)
    where = op.Transpose(op.NonZero(op.Reshape(keep, op.Constant(value_ints=[-1]))), perm=[1, 0])  # [nnz, 1]
    zeros = op.CastLike(op.ConstantOfShape(op.Constant(value_ints=[N * K])), values)
    dense = op.Reshape(op.ScatterND(zeros, where, values), op.Constant(value_ints=[N, K]))
    return _linear(x, dense, bias)
