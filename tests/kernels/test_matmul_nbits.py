"""matmul_nbits: bit codecs, the reference against ONNX Runtime's MatMulNBits, and the
Triton kernel against the reference (under the interpreter when there is no GPU)."""
import os

import pytest
import torch

from rarefy.kernels.matmul_nbits import (
    dequantize_nbits,
    matmul_nbits,
    matmul_nbits_reference,
    pack_bits,
    unpack_bits,
)

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _naive_pack(codes: list, bits: int) -> list:
    """The bitstream definition, one bit at a time: code i at bits [i*bits, (i+1)*bits)."""
    out = [0] * ((len(codes) * bits + 7) // 8)
    for i, c in enumerate(codes):
        for b in range(bits):
            if (c >> b) & 1:
                out[(i * bits + b) // 8] |= 1 << ((i * bits + b) % 8)
    return out


def _random_layer(N, K, bits, block_size, with_zp, gen):
    """Random codes, scales sized so y is O(1), optional packed zero points."""
    n_blocks = -(-K // block_size)
    codes = torch.randint(0, 1 << bits, (N, n_blocks * block_size), generator=gen)
    qweight = pack_bits(codes, bits).reshape(N, n_blocks, block_size * bits // 8)
    scales = (0.5 + torch.rand(N, n_blocks, generator=gen)) / ((1 << (bits - 1)) * K**0.5)
    zp = pack_bits(torch.randint(0, 1 << bits, (N, n_blocks), generator=gen), bits) if with_zp else None
    return qweight, scales, zp


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("length", [0, 1, 5, 8, 13, 64])
def test_pack_bits_is_the_lsb_first_bitstream(bits, length):
    gen = torch.Generator().manual_seed(bits * 100 + length)
    codes = torch.randint(0, 1 << bits, (3, length), generator=gen)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, (length * bits + 7) // 8)
    for row in range(3):
        assert packed[row].tolist() == _naive_pack(codes[row].tolist(), bits)
    assert torch.equal(unpack_bits(packed, bits, length), codes.to(torch.uint8))


def test_pack_bits_4bit_low_nibble_first_and_3bit_straddles():
    assert pack_bits(torch.tensor([1, 2]), 4).tolist() == [0x21]
    # codes 0..7 at 3 bits: code 2 (0b010) straddles bytes 0 and 1, code 5 (0b101) bytes 1 and 2
    assert pack_bits(torch.arange(8), 3).tolist() == [0b10001000, 0b11000110, 0b11111010]


def _ort_matmul_nbits(x, qweight, scales, zero_points, K, N, bits, block_size):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(qweight.numpy(), "qweight"), numpy_helper.from_array(scales.numpy(), "scales")]
    inputs = ["x", "qweight", "scales"]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points.numpy(), "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node(
        "MatMulNBits", inputs, ["y"], domain="com.microsoft", K=K, N=N, bits=bits, block_size=block_size
    )
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10
    )
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])


# ORT's CPU MatMulNBits supports 2, 4 and 8 bits; 3 bits is rarefy's extension of the layout.
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("with_zp", [False, True])
@pytest.mark.parametrize("block_size,K", [(16, 100), (32, 64), (128, 300)])
def test_reference_matches_onnxruntime_layout(bits, with_zp, block_size, K):
    gen = torch.Generator().manual_seed(7)
    N = 24
    qweight, scales, zp = _random_layer(N, K, bits, block_size, with_zp, gen)
    x = torch.randn(5, K, generator=gen)
    ours = matmul_nbits_reference(x, qweight, scales, zp, None, K, N, bits, block_size)
    theirs = _ort_matmul_nbits(x, qweight, scales, zp, K, N, bits, block_size)
    # same dequantized weight; only fp32 summation order differs (y is O(1))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_dequantize_nbits_applies_block_zero_points_and_scales():
    # one row, K=20 over two blocks of 16 at 4 bits: zp 3 then 9, scales 0.5 then 2
    codes = torch.arange(32) % 16
    qweight = pack_bits(codes[None], 4).reshape(1, 2, 8)
    scales = torch.tensor([[0.5, 2.0]])
    zp = pack_bits(torch.tensor([[3, 9]]), 4)
    w = dequantize_nbits(qweight, scales, zp, 20, 1, 4, 16)
    expected = torch.cat([(codes[:16] - 3) * 0.5, (codes[16:20] - 9) * 2.0]).float()
    assert torch.equal(w[0], expected)
    w_sym = dequantize_nbits(qweight, scales, None, 20, 1, 4, 16)
    assert torch.equal(w_sym[0, :16], (codes[:16] - 8) * 0.5)


# block 16 with K=100 makes tiles span several blocks (per-element scales); 128 and 512 keep
# each tile in one block (scale after the dot); 512 > K is per-channel with a padded block.
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("with_zp", [False, True])
@pytest.mark.parametrize("block_size,K", [(16, 100), (128, 300), (512, 300)])
def test_kernel_matches_reference_fp32(bits, with_zp, block_size, K):
    gen = torch.Generator().manual_seed(bits * 10 + block_size)
    N = 40  # not a multiple of the tile: masked columns
    qweight, scales, zp = _random_layer(N, K, bits, block_size, with_zp, gen)
    x = torch.randn(2, 3, K, generator=gen)  # leading dims flatten to M = 6
    bias = torch.randn(N, generator=gen)
    args = [t.to(DEVICE) if t is not None else None for t in (x, qweight, scales, zp, bias)]
    y = matmul_nbits(*args, K, N, bits, block_size)
    ref = matmul_nbits_reference(*args, K, N, bits, block_size)
    assert y.shape == (2, 3, N) and y.dtype == torch.float32
    # exact dequantization, fp32 accumulation: only summation order differs
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 128])
def test_kernel_half_precision_activations(dtype, block_size):
    gen = torch.Generator().manual_seed(3)
    K, N, bits = 96, 48, 4
    qweight, scales, zp = _random_layer(N, K, bits, block_size, True, gen)
    x = torch.randn(37, K, generator=gen).to(dtype)
    scales = scales.to(dtype)
    args = [t.to(DEVICE) for t in (x, qweight, scales, zp)]
    y = matmul_nbits(*args, None, K, N, bits, block_size)
    ref = matmul_nbits_reference(*args, None, K, N, bits, block_size)
    assert y.dtype == dtype and y.shape == (37, N)
    # both round the fp32 result to `dtype` once; block 16 also rounds each dequantized
    # weight to fp16 before the dot: allow a few output ulps (fp16 2**-10, bf16 2**-7)
    tol = 4e-3 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol)


def test_kernel_handles_empty_and_single_rows():
    gen = torch.Generator().manual_seed(5)
    K, N, bits, block_size = 64, 20, 4, 32
    qweight, scales, _ = _random_layer(N, K, bits, block_size, False, gen)
    qweight, scales = qweight.to(DEVICE), scales.to(DEVICE)
    empty = matmul_nbits(torch.zeros(0, K, device=DEVICE), qweight, scales, None, None, K, N, bits, block_size)
    assert empty.shape == (0, N)
    x = torch.randn(1, K, generator=gen).to(DEVICE)
    torch.testing.assert_close(
        matmul_nbits(x, qweight, scales, None, None, K, N, bits, block_size),
        matmul_nbits_reference(x, qweight, scales, None, None, K, N, bits, block_size),
        rtol=1e-5, atol=1e-5,
    )


def test_rejects_layout_mismatch():
    qweight = torch.zeros(8, 2, 8, dtype=torch.uint8)  # 4-bit, block 16, K <= 32
    scales = torch.ones(8, 2)
    with pytest.raises(ValueError, match="qweight"):
        matmul_nbits_reference(torch.zeros(1, 32), qweight, scales, None, None, 32, 8, 4, 32)
    with pytest.raises(ValueError, match="block_size"):
        matmul_nbits(torch.zeros(1, 32), qweight, scales, None, None, 32, 8, 4, 24)
    with pytest.raises(ValueError, match="bits"):
        matmul_nbits(torch.zeros(1, 32), qweight, scales, None, None, 32, 8, 5, 16)
    with pytest.raises(ValueError, match="zero_points"):
        zp = torch.zeros(8, 2, dtype=torch.uint8)  # 2 blocks * 4 bits fit in 1 byte
        matmul_nbits_reference(torch.zeros(1, 32), qweight, scales, zp, None, 32, 8, 4, 16)
