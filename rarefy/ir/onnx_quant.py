"""ONNX subgraphs of the quantized linears, written once for both ONNX paths.

The same builders serve the FX export (``backends/onnx_quant.py`` calls them inside
``torch.onnx`` custom translations, through onnxscript) and the in-place rewrite of
ONNX-dialect graphs (``ir/onnx_sites.py`` calls them on an ``onnx_ir`` tape). A builder is
anything with ``op(op_type, *inputs, domain="", num_outputs=1, **attributes) -> value`` (a
tuple of values when ``num_outputs > 1``), ``const(array)``
and ``opset`` (the default-domain opset version): ``TapeBuilder`` here, ``ScriptBuilder``
in the backend.

* ``w8a8_linear`` — W8A8 with dynamic per-token activations:
  ``ReduceMax(Abs(x))/127`` per row, codes ``Round(x / scale) + 128`` as uint8 (symmetric
  int8 shifted by the zero point 128: u8 x s8 is the dot product x86 VNNI runs natively and
  ONNX Runtime's MLAS fast path; s8 x s8 measured ~3x slower on MiniLM), then one
  ``com.microsoft::MatMulIntegerToFloat`` with the per-token ``[..., 1]`` scale and the
  per-channel weight scale, then the bias. ONNX's ``DynamicQuantizeLinear`` is per tensor
  and ``DynamicQuantizeMatMul`` takes one activation scale only; per-token keeps MiniLM's
  embedding cosine at 0.997 where per-tensor gives 0.992 (ORT's own per-channel recipe).
  On one 4096 x 384 x 1152 linear (2 threads) this form measured 133 ms median against
  126 ms for per-tensor ``DynamicQuantizeLinear`` + ``MatMulIntegerToFloat`` and 103 ms
  for the fused ``DynamicQuantizeMatMul`` (fp32: 411 ms), on the loaded shared machine.
  ``Round`` is half-to-even where the torch reference rounds half away from zero: codes
  differ only on exact ties.
* ``w8a8_tensor_linear`` — W8A8 with one dynamic activation scale per tensor
  (``QuantizeActivations(granularity="tensor")``): ``DynamicQuantizeLinear`` plus
  ``com.microsoft::MatMulIntegerToFloat`` (bias inside), the form ONNX Runtime's own
  ``quantize_dynamic`` produces. ONNX Runtime merges the identical ``DynamicQuantizeLinear``
  nodes of linears reading one tensor (common-subexpression elimination, basic level: q/k/v
  quantize their shared input once) and fuses each remaining single-reader pair into one
  ``DynamicQuantizeMatMul``; emitting ``DynamicQuantizeMatMul`` directly quantized the shared
  input once per linear (MiniLM, 1 core: q/k/v 12.4 ms a layer against 11.4 ms shared).
* ``dequant_matmul`` — bit widths ONNX Runtime's MatMulNBits has no kernel for (3 bits):
  the packed LSB-first bitstream (``rarefy/ir/ops.py``) is read as byte values by
  ``DequantizeLinear`` (scale 1), unpacked with ``Gather`` / ``Div`` / ``Floor`` (exact in
  fp32), dequantized and multiplied with a plain ``MatMul``. The artifact keeps 3/8 byte
  per weight plus the scales (the same bytes as MatMulNBits would); the price is that the
  weight is rebuilt in fp32 at run time unless the runtime folds it.
* ``matmul_nbits`` — one ``com.microsoft::MatMulNBits`` node (2, 4 and 8 bits).
"""
from __future__ import annotations

import numpy as np
import onnx

MSFT_DOMAIN = "com.microsoft"
MATMUL_NBITS_BITS = (2, 4, 8)  # ONNX Runtime 1.31's CPU MatMulNBits kernels


class TapeBuilder:
    """Builds nodes on an ``onnx_ir`` tape (the ONNX-dialect rewrite)."""

    def __init__(self, opset: int):
        import onnx_ir as ir

        self.tape = ir.tape.Tape()
        self.opset = opset

    def op(self, op_type: str, *inputs, domain: str = "", num_outputs: int = 1, **attributes):
        attributes = {k: v for k, v in attributes.items() if v is not None}
        if num_outputs > 1:
            return self.tape.op_multi_out(op_type, list(inputs), attributes=attributes, domain=domain,
                                          num_outputs=num_outputs)
        return self.tape.op(op_type, list(inputs), attributes=attributes, domain=domain)

    def const(self, array: np.ndarray):
        import onnx_ir as ir

        return self.tape.op("Constant", [], attributes={"value": ir.tensor(np.asarray(array))})


def w8a8_linear(b, x, w_t, w_scale, bias):
    """``y = x @ dequant(w_t) + bias`` with ``x`` quantized per token; ``w_t`` int8 ``[K, N]``."""
    abs_x = b.op("Abs", x)
    if b.opset >= 18:
        amax = b.op("ReduceMax", abs_x, b.const(np.array([-1], np.int64)), keepdims=1)
    else:
        amax = b.op("ReduceMax", abs_x, axes=[-1], keepdims=1)
    # the floor keeps an all-zero row finite (its codes are all 128, i.e. 0)
    scale = b.op("Mul", b.op("Max", amax, b.const(np.array(1e-30, np.float32))),
                 b.const(np.array(1 / 127, np.float32)))
    shifted = b.op("Add", b.op("Round", b.op("Div", x, scale)), b.const(np.array(128, np.float32)))
    codes = b.op("Cast", shifted, to=onnx.TensorProto.UINT8)
    y = b.op("MatMulIntegerToFloat", codes, unsigned_weight(b, w_t), scale, w_scale, b.const(np.array(128, np.uint8)),
             b.const(np.array(128, np.uint8)), domain=MSFT_DOMAIN)
    # the bias is a separate Add: ONNX Runtime 1.31 mis-adds MatMulIntegerToFloat's own bias
    # input when a_scale is per row (measured 47% relative error on a 4096 x 384 x 1152 linear)
    return b.op("Add", y, bias) if bias is not None else y


def w8a8_tensor_linear(b, x, w_t, w_scale, bias):
    """``y = x @ dequant(w_t) + bias`` with ``x`` quantized per tensor (``DynamicQuantizeLinear``)
    and ``com.microsoft::MatMulIntegerToFloat``; ``w_t`` int8 ``[K, N]``, ``w_scale`` per column
    ``[N]``. ONNX Runtime shares one quantization among the linears that read ``x`` and fuses a
    lone pair into ``DynamicQuantizeMatMul`` (module docstring)."""
    codes, scale, zero = b.op("DynamicQuantizeLinear", x, num_outputs=3)
    extra = [bias] if bias is not None else []
    return b.op("MatMulIntegerToFloat", codes, unsigned_weight(b, w_t), scale, w_scale, zero,
                b.const(np.array(128, np.uint8)), *extra, domain=MSFT_DOMAIN)


def unsigned_weight(b, w_t):
    """int8 weight codes as uint8 with zero point 128 (``w + 128``; the file keeps the int8 codes).

    ONNX Runtime's uint8 x int8 GEMM on x86 CPUs without VNNI (AVX2) multiplies pairs with
    ``vpmaddubsw``, whose int16 sums saturate: measured here (AMD EPYC, AVX2 only, ORT 1.31 and
    1.32) 11% relative error on a 4 x 64 x 8 product of full-range codes and 16 dB SQNR on one
    W8A8 linear. uint8 x uint8 takes a widening kernel that is exact on every CPU.
    """
    wide = b.op("Cast", w_t, to=onnx.TensorProto.INT16)
    return b.op("Cast", b.op("Add", wide, b.const(np.array(128, np.int16))), to=onnx.TensorProto.UINT8)


def matmul_nbits(b, x, qweight, scales_flat, zero_points_flat, bias, K: int, N: int, bits: int, block_size: int):
    """One MatMulNBits node; ``accuracy_level=0`` keeps activations fp32 (see onnx_lowering)."""
    extra = [None, bias] if bias is not None else []
    return b.op("MatMulNBits", x, qweight, scales_flat, zero_points_flat, *extra, domain=MSFT_DOMAIN,
                K=K, N=N, bits=bits, block_size=block_size, accuracy_level=0)


def _unpack_last_axis(b, packed_bytes, count: int, bits: int):
    """Codes ``[..., count]`` of an LSB-first bitstream along the last axis, as exact floats.

    ``packed_bytes`` holds the byte values 0..255 as floats; every intermediate stays below
    2**16, so fp32 arithmetic is exact.
    """
    start = np.arange(count) * bits
    low = start // 8
    width = (count * bits + 7) // 8
    high = np.minimum(low + 1, width - 1)  # a code inside the last byte never reads past it
    # word = byte[low] + 256 * byte[low + 1]; code = floor(word / 2**(start % 8)) mod 2**bits
    word = b.op("Add", b.op("Gather", packed_bytes, b.const(low.astype(np.int64)), axis=-1),
                b.op("Mul", b.op("Gather", packed_bytes, b.const(high.astype(np.int64)), axis=-1),
                     b.const(np.array(256, np.float32))))
    shifted = b.op("Floor", b.op("Div", word, b.const((1 << (start % 8)).astype(np.float32))))
    levels = b.const(np.array(1 << bits, np.float32))
    return b.op("Sub", shifted, b.op("Mul", b.op("Floor", b.op("Div", shifted, levels)), levels))


def _byte_values(b, packed):
    """uint8 -> float byte values through DequantizeLinear (scale 1): exporters' constant
    folders keep DequantizeLinear, so the artifact stores the packed bytes, not fp32 weights."""
    return b.op("DequantizeLinear", packed, b.const(np.array(1.0, np.float32)))


def dequant_matmul(b, x, qweight, scales, zero_points, bias, K: int, N: int, bits: int, block_size: int):
    """``x @ W.T + bias`` with ``W`` dequantized from the MatMulNBits layout by standard ops.

    ``qweight`` uint8 ``[N, n_blocks, block_size*bits/8]``, ``scales`` ``[N, n_blocks]``,
    ``zero_points`` None or packed uint8 ``[N, ceil(n_blocks*bits/8)]``.
    """
    n_blocks = -(-K // block_size)
    codes = _unpack_last_axis(b, _byte_values(b, qweight), block_size, bits)
    if zero_points is None:
        zeros = b.const(np.array(1 << (bits - 1), np.float32))
    else:
        unpacked = _unpack_last_axis(b, _byte_values(b, zero_points), n_blocks, bits)
        zeros = b.op("Unsqueeze", unpacked, b.const(np.array([-1], np.int64)))
    centred = b.op("Sub", codes, zeros)
    weight = b.op("Mul", centred, b.op("Unsqueeze", scales, b.const(np.array([-1], np.int64))))
    weight = b.op("Reshape", weight, b.const(np.array([N, n_blocks * block_size], np.int64)))
    if n_blocks * block_size != K:  # the ragged last block's padding codes
        weight = b.op("Slice", weight, b.const(np.array([0], np.int64)), b.const(np.array([K], np.int64)),
                      b.const(np.array([1], np.int64)))
    y = b.op("MatMul", x, b.op("Transpose", weight, perm=[1, 0]))
    return b.op("Add", y, bias) if bias is not None else y


GATHER_BLOCK_QUANTIZED_BITS = (4, 8)  # what ONNX Runtime's CPU GatherBlockQuantized reads from uint8 data


def embedding_nbits(b, ids, qweight, scales, zero_points, K: int, N: int, bits: int, block_size: int):
    """Rows ``ids`` of the [N, K] table in the MatMulNBits layout: ``[*ids.shape, K]``.

    4 and 8 bits: one ``com.microsoft::GatherBlockQuantized``, which reads uint8 data with
    MatMulNBits' conventions (LSB-first codes, default zero point ``2**(bits-1)``), so a tied
    LM head's packed weight serves both ops (reshaped to [N, n_blocks * bytes per block]).
    Other widths: the gathered rows are dequantized by standard ops.
    """
    n_blocks = -(-K // block_size)
    ids_shape = b.op("Shape", ids)
    flat_ids = b.op("Reshape", ids, b.const(np.array([-1], np.int64)))
    if bits in GATHER_BLOCK_QUANTIZED_BITS:
        data = b.op("Reshape", qweight, b.const(np.array([N, n_blocks * block_size * bits // 8], np.int64)))
        rows = b.op("GatherBlockQuantized", data, flat_ids, scales, zero_points, domain=MSFT_DOMAIN,
                    gather_axis=0, quantize_axis=1, block_size=block_size, bits=bits)
    else:
        codes = _unpack_last_axis(b, _byte_values(b, b.op("Gather", qweight, flat_ids, axis=0)), block_size, bits)
        if zero_points is None:
            zeros = b.const(np.array(1 << (bits - 1), np.float32))
        else:
            packed = b.op("Gather", zero_points, flat_ids, axis=0)
            zeros = b.op("Unsqueeze", _unpack_last_axis(b, _byte_values(b, packed), n_blocks, bits),
                         b.const(np.array([-1], np.int64)))
        row_scales = b.op("Unsqueeze", b.op("Gather", scales, flat_ids, axis=0), b.const(np.array([-1], np.int64)))
        rows = b.op("Reshape", b.op("Mul", b.op("Sub", codes, zeros), row_scales),
                    b.const(np.array([-1, n_blocks * block_size], np.int64)))
    if n_blocks * block_size != K:  # the ragged last block's padding
        rows = b.op("Slice", rows, b.const(np.array([0], np.int64)), b.const(np.array([K], np.int64)),
                    b.const(np.array([1], np.int64)))
    return b.op("Reshape", rows, b.op("Concat", ids_shape, b.const(np.array([K], np.int64)), axis=0))

