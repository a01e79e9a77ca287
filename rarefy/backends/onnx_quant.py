"""ONNX translations of the quantized linears (W8A8, and 3-bit weight-only).

``rarefy::linear_w8a8`` becomes per-token ``Abs``/``ReduceMax``/``Round`` quantization
plus one ``com.microsoft::MatMulIntegerToFloat`` (why this form: ``rarefy/ir/onnx_quant.py``);
``rarefy::linear_w8a8_tensor`` becomes ``DynamicQuantizeLinear`` + ``MatMulIntegerToFloat``, which
ONNX Runtime shares among linears reading one tensor and fuses into ``DynamicQuantizeMatMul``.
``rarefy::matmul_nbits`` with 3 bits, which ONNX Runtime's MatMulNBits cannot run, becomes a
dequantize subgraph over the packed bitstream plus ``MatMul``. The subgraphs are shared with
the in-place rewrite of ONNX-dialect graphs.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch

from ..ir import onnx_quant
from .onnx_lowering import MSFT_DOMAIN, contrib_schema, msft_opset, onnx_translation

contrib_schema(
    "MatMulIntegerToFloat",
    inputs=[("A", "T1", False), ("B", "T2", False), ("a_scale", "T3", False), ("b_scale", "T3", False),
            ("a_zero_point", "T1", True), ("b_zero_point", "T2", True), ("bias", "T3", True)],
    outputs=[("Y", "T3")],
    types=[("T1", ["tensor(int8)", "tensor(uint8)"]), ("T2", ["tensor(int8)", "tensor(uint8)"]),
           ("T3", ["tensor(float)", "tensor(float16)"])],
    attributes=[],
)


class ScriptBuilder:
    """The onnx_quant builder interface over onnxscript (inside a torch.onnx translation)."""

    opset = 18

    def op(self, op_type: str, *inputs, domain: str = "", num_outputs: int = 1, **attributes):
        from onnxscript import opset18

        # num_outputs is part of the builder interface for TapeBuilder; onnxscript returns the
        # tuple of a multi-output op by itself
        opset = msft_opset() if domain == MSFT_DOMAIN else opset18
        return getattr(opset, op_type)(*inputs, **attributes)

    def const(self, array: np.ndarray):
        from onnxscript import opset18

        return opset18.Constant(value=onnx.numpy_helper.from_array(np.asarray(array)))


@onnx_translation(torch.ops.rarefy.linear_w8a8.default)
def _linear_w8a8(x, w_q, w_scale, bias):
    b = ScriptBuilder()
    # w_q is [N, K] (the nn.Linear layout); ONNX Runtime folds this Transpose of a constant
    return onnx_quant.w8a8_linear(b, x, b.op("Transpose", w_q, perm=[1, 0]), w_scale, bias)


@onnx_translation(torch.ops.rarefy.linear_w8a8_tensor.default)
def _linear_w8a8_tensor(x, w_q, w_scale, bias):
    b = ScriptBuilder()
    return onnx_quant.w8a8_tensor_linear(b, x, b.op("Transpose", w_q, perm=[1, 0]), w_scale, bias)


def dequant_matmul_nbits(x, qweight, scales, zero_points, bias, K, N, bits, block_size):
    """The 3-bit path of ``rarefy::matmul_nbits`` (called by its MatMulNBits translation)."""
    return onnx_quant.dequant_matmul(ScriptBuilder(), x, qweight, scales, zero_points, bias, K, N, bits, block_size)


contrib_schema(
    "GatherBlockQuantized",
    inputs=[("data", "T1", False), ("indices", "Tind", False), ("scales", "T2", False),
            ("zero_points", "T1", True)],
    outputs=[("output", "T2")],
    types=[("T1", ["tensor(uint8)", "tensor(int4)", "tensor(uint4)"]),
           ("T2", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]), ("Tind", ["tensor(int32)", "tensor(int64)"])],
    attributes=[("gather_axis", "int", False), ("quantize_axis", "int", False), ("block_size", "int", False),
                ("bits", "int", False)],
)


@onnx_translation(torch.ops.rarefy.embedding_nbits.default)
def _embedding_nbits(ids, qweight, scales, zero_points, K, N, bits, block_size):
    return onnx_quant.embedding_nbits(ScriptBuilder(), ids, qweight, scales, zero_points, K, N, bits, block_size)

