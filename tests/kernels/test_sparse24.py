"""sparse24: the 2:4 compressed format, and both Triton kernels (index gather for M <= 4,
dense-in-registers tl.dot above) against the reference, with float and 4-bit values."""
import os

import pytest
import torch

from rarefy.kernels.matmul_nbits import pack_bits
from rarefy.kernels.sparse24 import (
    GATHER_MAX_M,
    compress_24,
    decompress_24,
    dequantize_values_int4,
    sparse24_matmul,
    sparse24_matmul_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _random_24(N, K, gen):
    """A 2:4 weight with some groups holding 1 or 0 non-zeros."""
    groups = torch.randn(N, K // 4, 4, generator=gen)
    order = torch.rand(N, K // 4, 4, generator=gen).argsort(-1)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :2], True)
    groups = groups * keep
    groups[:, ::5] = 0  # empty groups
    groups[:, 1::7, 1:] = 0  # groups with at most one non-zero
    return (groups / K**0.5).reshape(N, K)


def _random_int4_values(N, K, group_size, with_zp, gen):
    KC = K // 2
    n_groups = -(-KC // group_size)
    values = pack_bits(torch.randint(0, 16, (N, KC), generator=gen), 4)
    scales = (0.5 + torch.rand(N, n_groups, generator=gen)) / (8 * KC**0.5)
    zp = torch.randint(0, 16, (N, n_groups), generator=gen, dtype=torch.uint8) if with_zp else None
    return values, scales, zp


def test_compress_24_layout():
    row = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 0.0]])
    values, indices = compress_24(row)
    assert values.tolist() == [[1.5, -2.0, 3.0, 0.0]]  # a lone non-zero keeps the lowest free slot
    # positions 1, 3, 0, 1 as 2-bit fields, LSB first: 1 | 3 << 2 | 0 << 4 | 1 << 6
    assert indices.dtype == torch.uint8 and indices.tolist() == [[1 | 3 << 2 | 1 << 6]]


@pytest.mark.parametrize("K", [8, 100, 128])  # 100: K/8 is not whole, the last byte is half used
def test_compress_decompress_roundtrip(K):
    gen = torch.Generator().manual_seed(K)
    dense = _random_24(16, K, gen)
    values, indices = compress_24(dense)
    assert values.shape == (16, K // 2) and indices.shape == (16, (K + 7) // 8)
    assert torch.equal(decompress_24(values, indices, K), dense)
    assert torch.equal(decompress_24(values.half(), indices, K), dense.half())


def test_compress_24_rejects_dense_groups():
    with pytest.raises(ValueError, match="2:4"):
        compress_24(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="K % 4"):
        compress_24(torch.zeros(2, 6))


@pytest.mark.parametrize("M", [1, 3, 37])  # 1 and 3: index-gather kernel; 37: tl.dot kernel
@pytest.mark.parametrize("K", [64, 100])
def test_kernel_matches_reference_float_values(M, K):
    gen = torch.Generator().manual_seed(M * K)
    N = 40
    dense = _random_24(N, K, gen)
    values, indices = compress_24(dense)
    x = torch.randn(M, K, generator=gen)
    bias = torch.randn(N, generator=gen)
    ref = sparse24_matmul_reference(x, values, indices, bias, K)
    # the reference is the dense linear
    torch.testing.assert_close(ref, torch.nn.functional.linear(x, dense, bias), rtol=1e-5, atol=1e-5)
    y = sparse24_matmul(*(t.to(DEVICE) for t in (x, values, indices, bias)), K)
    assert y.shape == (M, N) and y.dtype == torch.float32
    # fp32 accumulation of the same products, in another order
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M", [2, 37])
@pytest.mark.parametrize("with_zp", [False, True])
@pytest.mark.parametrize("group_size", [6, 16, 64])  # 6 does not divide K/2 = 50: ragged last group
def test_kernel_matches_reference_int4_values(M, with_zp, group_size):
    gen = torch.Generator().manual_seed(M + group_size)
    N, K = 24, 100
    values, scales, zp = _random_int4_values(N, K, group_size, with_zp, gen)
    _, indices = compress_24(_random_24(N, K, gen))
    x = torch.randn(2, M, K, generator=gen)
    x, values, indices, scales = (t.to(DEVICE) for t in (x, values, indices, scales))
    zp = zp.to(DEVICE) if zp is not None else None
    y = sparse24_matmul(x, values, indices, None, K, scales, zp, group_size)
    ref = sparse24_matmul_reference(x, values, indices, None, K, scales, zp, group_size)
    assert y.shape == (2, M, N)
    # exact dequantization in both; fp32 summation order differs
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_int4_reference_is_dequantize_then_decompress():
    gen = torch.Generator().manual_seed(1)
    N, K, group_size = 8, 32, 4
    values, scales, zp = _random_int4_values(N, K, group_size, True, gen)
    _, indices = compress_24(_random_24(N, K, gen))
    kept = dequantize_values_int4(values, scales, zp, group_size, K // 2)
    codes = torch.stack([values & 15, values >> 4], -1).reshape(N, K // 2).float()
    expected = (codes - zp.float().repeat_interleave(group_size, 1)) * scales.repeat_interleave(group_size, 1)
    torch.testing.assert_close(kept, expected, rtol=0, atol=0)
    x = torch.randn(3, K, generator=gen)
    torch.testing.assert_close(
        sparse24_matmul_reference(x, values, indices, None, K, scales, zp, group_size),
        x @ decompress_24(kept, indices, K).T,
        rtol=1e-6, atol=1e-6,
    )


@pytest.mark.parametrize("M", [GATHER_MAX_M, 20])
def test_kernel_half_precision(M):
    gen = torch.Generator().manual_seed(M)
    N, K = 48, 64
    values, indices = compress_24(_random_24(N, K, gen))
    x = torch.randn(M, K, generator=gen).half()
    args = [t.to(DEVICE) for t in (x, values.half(), indices)]
    y = sparse24_matmul(*args, None, K)
    ref = sparse24_matmul_reference(*args, None, K)
    assert y.dtype == torch.float16
    # one rounding of an fp32 sum to fp16 in both: about an ulp (2**-10 relative)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-3, atol=2e-3)


def test_sparse24_rejects_bad_operands():
    values, indices = compress_24(torch.zeros(4, 16))
    with pytest.raises(ValueError, match="indices"):
        sparse24_matmul_reference(torch.zeros(1, 16), values, indices[:, :1], None, 16)
    with pytest.raises(ValueError, match="group_size"):
        q = torch.zeros(4, 4, dtype=torch.uint8)
        sparse24_matmul(torch.zeros(1, 16), q, indices, None, 16, torch.ones(4, 2), None, 5)
