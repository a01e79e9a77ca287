"""gather_tokens (Triton, interpreter on CPU) against its torch reference.

A gather is a copy: the kernel must match bit for bit (atol=0).
"""

import pytest
import torch

from rarefy.kernels.token_gather import gather_tokens, gather_tokens_reference


def _index(B, S, S_keep, gen):
    # Sorted distinct kept positions, as a top-k keep set produces.
    return torch.stack([torch.randperm(S, generator=gen)[:S_keep].sort().values for _ in range(B)])


@pytest.mark.parametrize("B,S,S_keep,D", [(2, 17, 9, 48), (1, 64, 33, 300), (3, 8, 8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gather_matches_reference_exactly(B, S, S_keep, D, dtype):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, S, D, generator=gen).to(dtype)
    index = _index(B, S, S_keep, gen)
    out = gather_tokens(hidden, index)
    ref = gather_tokens_reference(hidden, index)
    assert out.shape == (B, S_keep, D) and out.dtype == dtype
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    # The oracle itself is plain advanced indexing.
    torch.testing.assert_close(ref, hidden[torch.arange(B)[:, None], index], atol=0, rtol=0)


def test_gather_strided_hidden_int32_index_and_repeats():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(2, 40, 24, generator=gen)
    hidden = base.transpose(1, 2)[:, :, ::2].transpose(1, 2)  # [2, 20, 24] with stride 2 along S, not contiguous
    index = torch.randint(0, 20, (2, 30), generator=gen, dtype=torch.int32)  # repeats allowed
    torch.testing.assert_close(gather_tokens(hidden, index), gather_tokens_reference(hidden, index), atol=0, rtol=0)


def test_gather_out_of_range_rows_are_zero():
    hidden = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([[0, 7, -1, 4]])
    out = gather_tokens(hidden, index)
    torch.testing.assert_close(out, gather_tokens_reference(hidden, index), atol=0, rtol=0)
    assert out[0, 1].abs().sum() == 0 and out[0, 2].abs().sum() == 0
    torch.testing.assert_close(out[0, 3], hidden[0, 4], atol=0, rtol=0)


def test_gather_empty_and_bad_inputs():
    hidden = torch.randn(2, 5, 8)
    assert gather_tokens(hidden, torch.zeros(2, 0, dtype=torch.int64)).shape == (2, 0, 8)
    with pytest.raises(ValueError):
        gather_tokens(hidden, torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(TypeError):
        gather_tokens(hidden, torch.zeros(2, 2))
