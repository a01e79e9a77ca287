"""The Triton decode paths of the KV-cache ops against their torch references (interpreter on CPU)."""
import pytest
import torch

from rarefy.kernels import kv_cache


def _kivi_state(B, H, C, D, G, R, bits, keys, values):
    state = [torch.zeros(B, H, C * bits // 8, D, dtype=torch.uint8), torch.zeros(B, H, C // G, D).half(),
             torch.zeros(B, H, C // G, D).half(), torch.zeros(B, H, C, D * bits // 8, dtype=torch.uint8),
             torch.zeros(B, H, C, D // G).half(), torch.zeros(B, H, C, D // G).half(),
             torch.zeros(B, H, R + G, D).half(), torch.zeros(B, H, R + G, D).half()]
    return list(kv_cache.kivi_write(*state, keys, values, torch.arange(keys.shape[2]), bits, G, R))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("length", [5, 70])  # all in the fp window / most of it quantized
def test_kivi_attention_triton_matches_reference(bits, length):
    B, Hq, H, C, D, G, R = 2, 4, 2, 128, 32, 16, 16
    keys, values = torch.randn(B, H, length, D), torch.randn(B, H, length, D)
    state = _kivi_state(B, H, C, D, G, R, bits, keys, values)
    q, k_new, v_new = torch.randn(B, Hq, 1, D), torch.randn(B, H, 1, D), torch.randn(B, H, 1, D)
    position = torch.tensor([length])
    ref = kv_cache.kivi_attention(q, k_new, v_new, *state, position, 0.17, bits, G, R)
    out = kv_cache.kivi_attention_triton(q, k_new, v_new, *state, position, 0.17, bits, G, R)
    # same dequantized values, fp32 products in both: only summation order differs
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_dense_cache_attention_triton_matches_reference():
    B, Hq, H, C, D = 2, 4, 2, 96, 32
    k_cache, v_cache = torch.randn(B, H, C, D), torch.randn(B, H, C, D)
    q, k_new, v_new = torch.randn(B, Hq, 1, D), torch.randn(B, H, 1, D), torch.randn(B, H, 1, D)
    position = torch.tensor([57])
    ref = kv_cache.cache_attention(q, k_new, v_new, k_cache, v_cache, position, 0.2)
    out = kv_cache.cache_attention_triton(q, k_new, v_new, k_cache, v_cache, position, 0.2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
