"""Numeric and task metrics comparing a compressed model with its reference.

Tensor metrics (``sqnr_db``, ``cosine``, ``per_row_cosine``,
``max_abs_error``) take a reference and a test tensor of the same shape (any
float dtype, or anything ``torch.as_tensor`` accepts), accumulate in float64
chunk by chunk (so a [8, 512, 49152] logit tensor is not copied whole to
float64) and return Python floats.

Task metrics: ``perplexity`` of a causal LM over token batches, and
``top1_agreement`` of two logit tensors. ``perplexity`` takes an
``nn.Module`` or any callable invoked as ``fn(**batch)`` that returns logits
``[B, S, V]`` (a tensor, a numpy array, an object with ``.logits``, or a
tuple whose first item is the logits), so a Hugging Face model, a rarefy
graph and an ONNX Runtime session wrapper are scored by the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

_CHUNK = 1 << 22  # elements per float64 chunk: 32 MiB


def _pair(reference, test) -> tuple[torch.Tensor, torch.Tensor]:
    ref = torch.as_tensor(reference).detach()
    tst = torch.as_tensor(test).detach()
    if ref.shape != tst.shape:
        raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs test {tuple(tst.shape)}")
    return ref, tst


def _flat_chunks(reference, test):
    """Yield matching float64 chunks of the flattened pair."""
    ref, tst = _pair(reference, test)
    ref, tst = ref.reshape(-1), tst.reshape(-1)
    for i in range(0, ref.numel(), _CHUNK):
        yield ref[i : i + _CHUNK].to(torch.float64), tst[i : i + _CHUNK].to(torch.float64)


def sqnr_db(reference, test) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (ref - test)^2)`` in dB.

    ``+inf`` when the tensors are identical; ``-inf`` when the reference is
    all zeros and the test is not.
    """
    signal = noise = 0.0
    for r, t in _flat_chunks(reference, test):
        signal += float(r.square().sum())
        noise += float((r - t).square().sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _cos(dot: torch.Tensor, nr: torch.Tensor, nt: torch.Tensor) -> torch.Tensor:
    # Zero vectors: two zeros agree (1), a zero against a non-zero does not (0).
    denom = (nr * nt).sqrt()
    both_zero = (nr == 0) & (nt == 0)
    out = torch.where(denom > 0, dot / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(dot))
    return torch.where(both_zero, torch.ones_like(out), out)


def cosine(reference, test) -> float:
    """Cosine similarity of the two tensors flattened into single vectors."""
    dot = nr = nt = torch.zeros((), dtype=torch.float64)
    for r, t in _flat_chunks(reference, test):
        dot = dot + (r * t).sum()
        nr = nr + r.square().sum()
        nt = nt + t.square().sum()
    return float(_cos(dot, nr, nt))


def per_row_cosine(reference, test) -> float:
    """Mean over rows of the cosine along the last dimension (e.g. per token, per embedding)."""
    ref, tst = _pair(reference, test)
    if ref.dim() == 0:
        raise ValueError("per_row_cosine needs at least one dimension")
    width = ref.shape[-1]
    ref, tst = ref.reshape(-1, width), tst.reshape(-1, width)
    rows = max(1, _CHUNK // max(width, 1))
    total, count = 0.0, 0
    for i in range(0, ref.shape[0], rows):
        r, t = ref[i : i + rows].to(torch.float64), tst[i : i + rows].to(torch.float64)
        total += float(_cos((r * t).sum(-1), r.square().sum(-1), t.square().sum(-1)).sum())
        count += r.shape[0]
    if count == 0:
        raise ValueError("per_row_cosine of empty tensors")
    return total / count


def max_abs_error(reference, test) -> float:
    """``max |reference - test|`` (0.0 for empty tensors; NaN when any difference is NaN)."""
    worst = 0.0
    for r, t in _flat_chunks(reference, test):
        if r.numel():
            chunk = float((r - t).abs().max())  # torch's max propagates NaN
            if math.isnan(chunk):
                return math.nan  # Python's max(0.0, nan) would drop it
            worst = max(worst, chunk)
    return worst


def _logits_of(output: Any) -> torch.Tensor:
    if hasattr(output, "logits"):
        output = output.logits
    elif isinstance(output, (tuple, list)):
        output = output[0]
    return torch.as_tensor(output)


def token_nll(
    model_or_callable: Callable[..., Any], batches: Iterable[Mapping[str, torch.Tensor]]
) -> tuple[float, int]:
    """``(sum of next-token NLL in nats, number of predicted tokens)`` over ``batches``.

    Position ``t`` predicts token ``t + 1``; a prediction counts only when
    both positions are real tokens under ``attention_mask`` (all ones when the
    batch has none).
    """
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            ids = batch["input_ids"]
            logits = _logits_of(model_or_callable(**batch))
            nll = next_token_nll(logits, ids, batch.get("attention_mask"))
            total += float(nll.to(torch.float64).sum())
            count += int(nll.numel())
    return total, count


def is_lm_logits(ids, outputs: list, vocab: int | None) -> bool:
    """Whether a graph's flat outputs start with logits over the vocabulary for every input
    token ``ids [B, S]``: a causal LM's first output."""
    return (ids is not None and bool(outputs) and outputs[0].dim() == 3 and outputs[0].shape[:2] == ids.shape
            and outputs[0].shape[-1] == vocab)


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """Per-prediction NLL (nats, differentiable) of logits ``[B, S, V]`` for ``ids [B, S]``:
    position ``t`` predicts token ``t + 1`` where both are real tokens under the mask."""
    if logits.shape[:2] != ids.shape or logits.dim() != 3:
        raise ValueError(f"expected logits [B, S, V] for input_ids {tuple(ids.shape)}, got {tuple(logits.shape)}")
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else torch.as_tensor(attention_mask).bool()
    keep = mask[:, :-1] & mask[:, 1:]
    pred = logits[:, :-1].float()[keep]  # [N, V]
    target = ids[:, 1:][keep].long()
    return torch.logsumexp(pred, -1) - pred.gather(-1, target[:, None]).squeeze(-1)


def perplexity(model_or_callable: Callable[..., Any], batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """Perplexity ``exp(mean next-token NLL)`` of a causal LM over ``batches``.

    ``model_or_callable(**batch)`` must return logits ``[B, S, V]`` (see the
    module docstring); the mean runs over every predicted token of every
    batch (see :func:`token_nll`), not over batch means.
    """
    total, count = token_nll(model_or_callable, batches)
    if count == 0:
        raise ValueError("perplexity: no predicted tokens (batches empty or fully masked)")
    return math.exp(total / count)


def top1_agreement(ref_logits, test_logits, attention_mask=None) -> float:
    """Fraction of positions whose argmax over the last dimension agrees.

    ``attention_mask`` (shape = logits shape without the last dimension)
    restricts the count to real tokens.
    """
    ref, tst = _pair(ref_logits, test_logits)
    agree = ref.argmax(-1) == tst.argmax(-1)
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask).bool()
        if mask.shape != agree.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match logits {tuple(ref.shape)}")
        agree = agree[mask]
    if agree.numel() == 0:
        raise ValueError("top1_agreement over zero positions")
    return float(agree.double().mean())
