"""Known-value checks for rarefy.eval.metrics."""

import math

import numpy as np
import pytest
import torch

from rarefy.eval.metrics import (
    cosine,
    max_abs_error,
    per_row_cosine,
    perplexity,
    sqnr_db,
    token_nll,
    top1_agreement,
)


def _noise_with_power(x: torch.Tensor, sqnr: float, seed: int) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    target = x.double().square().sum() / 10 ** (sqnr / 10)
    return (noise * (target / noise.square().sum()).sqrt()).to(x.dtype)


def test_sqnr_exact_noise_power():
    x = torch.randn(1000, 37, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for target in (0.0, 20.0, 47.5):
        # the noise power is set exactly, so only float64 rounding remains
        assert sqnr_db(x, x + _noise_with_power(x, target, 1)) == pytest.approx(target, abs=1e-9)


def test_sqnr_statistical_and_fp32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1_000_000, generator=g)
    y = x + 0.1 * torch.randn(1_000_000, generator=g)
    # unit-variance signal, noise std 0.1 -> 20 dB; 1e6 samples put the estimate within ~0.01 dB
    assert sqnr_db(x, y) == pytest.approx(20.0, abs=0.05)


def test_sqnr_edge_cases():
    x = torch.randn(10, generator=torch.Generator().manual_seed(0))
    assert sqnr_db(x, x.clone()) == math.inf
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf
    with pytest.raises(ValueError, match="shape mismatch"):
        sqnr_db(torch.zeros(3), torch.zeros(4))


def test_sqnr_chunked_matches_direct(monkeypatch):
    import rarefy.eval.metrics as m

    monkeypatch.setattr(m, "_CHUNK", 7)  # force many chunks
    x = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    y = x + 0.3 * torch.randn(5, 11, generator=torch.Generator().manual_seed(1))
    direct = 10 * math.log10(float(x.double().square().sum() / (x.double() - y.double()).square().sum()))
    assert sqnr_db(x, y) == pytest.approx(direct, abs=1e-9)
    direct_cos = torch.nn.functional.cosine_similarity(x.double().flatten(), y.double().flatten(), 0)
    assert cosine(x, y) == pytest.approx(float(direct_cos), abs=1e-12)
    assert max_abs_error(x, y) == float((x.double() - y.double()).abs().max())  # difference taken in float64


def test_cosine_known_values():
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([0.0, 2.0, 0.0])
    assert cosine(a, b) == 0.0
    assert cosine(a, 3 * a) == pytest.approx(1.0, abs=1e-12)
    assert cosine(a, -a) == pytest.approx(-1.0, abs=1e-12)
    assert cosine(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    assert cosine(torch.zeros(3), torch.zeros(3)) == 1.0
    assert cosine(torch.zeros(3), a) == 0.0


def test_cosine_accepts_numpy():
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == 0.0


def test_per_row_cosine_is_mean_over_rows():
    ref = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    test = torch.tensor([[0.0, 5.0], [2.0, 0.0], [-1.0, -1.0]])
    assert per_row_cosine(ref, test) == pytest.approx((0.0 + 1.0 - 1.0) / 3, abs=1e-12)
    # flattened cosine weights rows by norm; per-row does not
    big = torch.tensor([[100.0, 0.0], [1.0, 0.0]])
    off = torch.tensor([[100.0, 0.0], [0.0, 1.0]])
    assert per_row_cosine(big, off) == pytest.approx(0.5, abs=1e-12)
    assert cosine(big, off) > 0.99


def test_max_abs_error():
    assert max_abs_error(torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.5, -4.0, 3.0])) == 2.0
    assert max_abs_error(torch.zeros(0), torch.zeros(0)) == 0.0


def test_max_abs_error_propagates_nan_and_inf():
    # max(0.0, nan) is 0.0 in Python: a NaN output must not read as "no error"
    ref = torch.tensor([1.0, 2.0, 3.0])
    assert math.isnan(max_abs_error(ref, torch.tensor([1.0, float("nan"), 3.0])))
    assert max_abs_error(ref, torch.tensor([1.0, float("inf"), 3.0])) == math.inf
    assert math.isnan(max_abs_error(torch.tensor([float("nan")]), torch.tensor([float("nan")])))


def _batch(ids, mask=None):
    ids = torch.as_tensor(ids)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else torch.as_tensor(mask)}


def test_perplexity_uniform_logits_is_vocab_size():
    vocab = 49152
    batches = [_batch(torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(s))) for s in range(2)]

    def uniform(input_ids, attention_mask):
        return torch.zeros(*input_ids.shape, vocab)

    assert perplexity(uniform, batches) == pytest.approx(vocab, rel=1e-4)


def test_perplexity_shift_and_mask():
    vocab = 11
    ids = torch.tensor([[3, 5, 7, 2, 0, 0], [1, 4, 9, 8, 6, 10]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])

    def oracle(input_ids, attention_mask):
        # position t is sure of token t+1 at real positions, sure of a wrong token on padding
        logits = torch.full((*input_ids.shape, vocab), -1e4)
        nxt = torch.roll(input_ids, -1, dims=1)
        logits.scatter_(-1, nxt[..., None], 0.0)
        pad = attention_mask == 0
        logits[pad] = -1e4
        logits[pad, 0] = 1e4
        return logits

    total, count = token_nll(oracle, [_batch(ids, mask)])
    assert count == 3 + 5  # predictions whose source and target are both real
    assert perplexity(oracle, [_batch(ids, mask)]) == pytest.approx(1.0, abs=1e-6)


def test_perplexity_output_forms():
    vocab = 7
    batch = _batch(torch.tensor([[1, 2, 3]]))
    logits = torch.zeros(1, 3, vocab)

    class Out:
        def __init__(self, logits):
            self.logits = logits

    class Module(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return Out(torch.zeros(*input_ids.shape, vocab))

    for fn in (lambda **b: logits.numpy(), lambda **b: (logits,), lambda **b: Out(logits), Module()):
        assert perplexity(fn, [batch]) == pytest.approx(vocab, rel=1e-6)
    with pytest.raises(ValueError, match="logits"):
        perplexity(lambda **b: torch.zeros(1, 3), [batch])
    with pytest.raises(ValueError, match="no predicted tokens"):
        perplexity(lambda **b: logits, [])


def test_top1_agreement():
    ref = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    test = torch.tensor([[[0.0, 2.0], [0.0, 1.0], [5.0, 1.0]]])
    assert top1_agreement(ref, test) == pytest.approx(1 / 3)
    assert top1_agreement(ref, test, attention_mask=torch.tensor([[1, 1, 0]])) == pytest.approx(0.5)
    assert top1_agreement(ref, ref) == 1.0
