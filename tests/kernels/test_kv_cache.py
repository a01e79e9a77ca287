"""The Triton decode paths of the KV-cache ops against their torch references (interpreter on CPU)."""
import pytest
import torch

from rarefy.kernels import kv_cache


def _kivi_state(B, H, C, D, G, R, bits, keys, values):
    state = [torch.zeros(B, H, C * bits // 8, D, dtype=torch.uint8), torch.zeros(B, H, C // G, D).half(),
             torch.zeros(B, H, C // G, D).half(), torch.zeros(B, H, C, D * bits // 8, dtype=torch.uint8),
             torch.zeros(B, H, C, D // G).half(), torch.zeros(B, H, C, D // G).half(),
             torch.zeros(B, H, R + G, D).half(), torch.zeros(B, H, R + G, D).half() if R else None]
    state = list(kv_cache.kivi_write(*state, keys, values, torch.arange(keys.shape[2]), bits, G, R))
    return state if R else [*state, None]


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("length, R", [(5, 16), (70, 16), (70, 0)])  # all in the fp window / most quantized /
def test_kivi_attention_triton_matches_reference(bits, length, R):  # no fp window (values from their codes)
    B, Hq, H, C, D, G = 2, 4, 2, 128, 32, 16
    keys, values = torch.randn(B, H, length, D), torch.randn(B, H, length, D)
    state = _kivi_state(B, H, C, D, G, R, bits, keys, values)
    q, k_new, v_new = torch.randn(B, Hq, 1, D), torch.randn(B, H, 1, D), torch.randn(B, H, 1, D)
    position = torch.tensor([length])
    ref = kv_cache.kivi_attention(q, k_new, v_new, *state, position, 0.17, bits, G, R)
    out = kv_cache.kivi_attention_triton(q, k_new, v_new, *state, position, 0.17, bits, G, R)
    # same codes, fp32 products in both; the reference folds the scales into q and p and reads a byte
    # as floors (code_j = u_j - 2**bits u_(j+1)), whose cancellation costs up to ~2**(8-bits) x fp32
    # rounding (~1e-5 at 2 bits), far below the quantization error (~1e-1 at 2 bits)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)


def test_dense_cache_attention_triton_matches_reference():
    B, Hq, H, C, D = 2, 4, 2, 96, 32
    k_cache, v_cache = torch.randn(B, H, C, D), torch.randn(B, H, C, D)
    q, k_new, v_new = torch.randn(B, Hq, 1, D), torch.randn(B, H, 1, D), torch.randn(B, H, 1, D)
    position = torch.tensor([57])
    ref = kv_cache.cache_attention(q, k_new, v_new, k_cache, v_cache, position, 0.2)
    out = kv_cache.cache_attention_triton(q, k_new, v_new, k_cache, v_cache, position, 0.2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
