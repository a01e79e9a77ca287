"""int8_gemm: per-token quantization and the int8 x int8 -> int32 matmul, Triton kernels
against their torch references (under the interpreter when there is no GPU)."""
import os

import pytest
import torch

from rarefy.kernels.int8_gemm import (
    int8_matmul,
    int8_matmul_reference,
    quantize_per_token,
    quantize_per_token_reference,
    w8a8_linear,
    w8a8_linear_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.double(), approx.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K", [16, 300, 600])  # 600 > the interpreter's 256-wide block: two passes loop
def test_quantize_per_token_matches_reference_exactly(dtype, K):
    gen = torch.Generator().manual_seed(K)
    x = (torch.randn(2, 5, K, generator=gen) * torch.rand(2, 5, 1, generator=gen) * 10).to(dtype)
    x[0, 0] = 0  # an all-zero token gets scale 1, codes 0
    x[1, 2, 3] = 0.5 * x[1, 2].float().abs().max() / 127 * 3  # near a rounding tie
    x_q, scale = quantize_per_token(x.to(DEVICE))
    ref_q, ref_scale = quantize_per_token_reference(x.to(DEVICE))
    assert x_q.dtype == torch.int8 and x_q.shape == x.shape and scale.shape == (2, 5)
    # identical fp32 arithmetic and rounding rule: bit-exact
    assert torch.equal(x_q, ref_q)
    assert torch.equal(scale, ref_scale)
    assert scale[0, 0] == 1 and not x_q[0, 0].any()


def test_quantize_per_token_reference_is_symmetric_absmax():
    x = torch.tensor([[0.0, 1.0, -2.54, 0.004], [127.0, 63.5, -0.5, 2.5]])
    x_q, scale = quantize_per_token_reference(x)
    torch.testing.assert_close(scale, torch.tensor([2.54 / 127, 1.0]), rtol=1e-7, atol=0)
    assert x_q[0].tolist() == [0, 50, -127, 0]
    assert x_q[1].tolist() == [127, 64, -1, 3]  # ties round away from zero (not to even)
    # round to nearest: error at most half a step
    assert ((x_q.float() * scale[:, None] - x).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("M,K,N", [(1, 16, 16), (5, 100, 40), (33, 300, 70)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_matmul_matches_reference(M, K, N, with_bias):
    gen = torch.Generator().manual_seed(M * K + N)
    x_q = torch.randint(-127, 128, (M, K), generator=gen, dtype=torch.int8)
    w_q = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    x_scale, w_scale = torch.rand(M, generator=gen) / 100, torch.rand(N, generator=gen) / 100
    bias = torch.randn(N, generator=gen) if with_bias else None
    args = [t.to(DEVICE) if t is not None else None for t in (x_q, x_scale, w_q, w_scale, bias)]
    y = int8_matmul(*args)
    ref = int8_matmul_reference(*args)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    # the int32 sum is exact in both; the same fp32 epilogue (acc * xs * ws + b) follows
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    # and the reference is the plain definition
    plain = (x_q.double() @ w_q.double().T * x_scale.double()[:, None] * w_scale.double()[None, :]).float()
    torch.testing.assert_close(ref.cpu(), plain + (bias if with_bias else 0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_w8a8_linear_matches_reference_and_float_linear(dtype):
    gen = torch.Generator().manual_seed(11)
    K, N = 128, 48
    x = torch.randn(2, 9, K, generator=gen)
    w = torch.randn(N, K, generator=gen) / K**0.5
    bias = torch.randn(N, generator=gen)
    w_q, w_scale = quantize_per_token_reference(w)  # symmetric per-output-channel weights
    xd = x.to(dtype).to(DEVICE)
    y = w8a8_linear(xd, w_q.to(DEVICE), w_scale.to(DEVICE), bias.to(DEVICE))
    ref = w8a8_linear_reference(xd, w_q.to(DEVICE), w_scale.to(DEVICE), bias.to(DEVICE))
    assert y.dtype == dtype and y.shape == (2, 9, N)
    # same codes and fp32 result, one rounding to dtype in both
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    # budget: absmax int8 on both operands of Gaussian data measures about 43 dB here (each
    # side alone ~48 dB); a 38 dB floor leaves margin and still catches a wrong scale
    exact = torch.nn.functional.linear(xd.float().cpu(), w, bias)
    assert _sqnr_db(exact, y.float().cpu()) > 38


def test_int8_matmul_rejects_bad_operands():
    x_q = torch.zeros(4, 32, dtype=torch.int8)
    with pytest.raises(TypeError):
        int8_matmul(x_q.float(), torch.ones(4), x_q, torch.ones(4))
    with pytest.raises(ValueError, match="w_scale"):
        int8_matmul(x_q, torch.ones(4), torch.zeros(8, 32, dtype=torch.int8), torch.ones(4))
    with pytest.raises(ValueError):
        int8_matmul_reference(x_q, torch.ones(4), torch.zeros(8, 16, dtype=torch.int8), torch.ones(8))


def test_per_tensor_w8a8_kernel_path_matches_its_reference():
    from rarefy.kernels.int8_gemm import quantize_per_tensor_reference, w8a8_tensor_linear, w8a8_tensor_linear_reference

    gen = torch.Generator().manual_seed(5)
    K, N = 96, 40
    x = torch.randn(3, 7, K, generator=gen) + 0.7  # skewed: the zero point is not 128
    w_q, w_scale = quantize_per_token_reference(torch.randn(N, K, generator=gen) / K**0.5)
    bias = torch.randn(N, generator=gen)
    codes, scale, zero = quantize_per_tensor_reference(x)
    assert codes.min() >= 0 and codes.max() == 255 and int(zero) != 128  # DynamicQuantizeLinear's grid
    y = w8a8_tensor_linear(x.to(DEVICE), w_q.to(DEVICE), w_scale.to(DEVICE), bias.to(DEVICE))
    ref = w8a8_tensor_linear_reference(x, w_q, w_scale, bias)
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-4, atol=1e-4)
    exact = torch.nn.functional.linear(x, w_q.float() * w_scale[:, None], bias)
    assert _sqnr_db(exact, ref) > 35  # uint8 over the whole (skewed) tensor still ~40 dB here
