"""Token selection and merging math: pure-torch references of the rarefy token ops.

Every function here is branch-free on data (no ``.item()``, no data-dependent shapes), so
the same code is the eager reference, the fake-shape rule's source, and, traced by
``torch.export``, the ONNX lowering (TopK, GatherElements, ScatterElements, Softmax, ...).

Shapes: ``hidden`` [B, S, D]; ``q``/``k`` [B, H, S, Dh] (``k`` may have fewer heads:
grouped-query attention; or ``k`` None and ``q`` the probabilities of an eager attention); ``mask`` None, bool (True = attend) or additive float, broadcast
to [B, 1 or H, S_q, S]; ``valid`` bool [B, S] (False = padding); ``index`` int64 [B, K].

* :func:`attention_received` — Zero-TPrune / EViT / FastV token scores: the attention each
  key receives, mean over heads and (real) queries, or from the last query only.
* :func:`select_tokens` — top ``ceil(S * num / den)`` tokens per row, padding ranked last,
  the first and/or last token always kept, indices in ascending order.
* :func:`gather_mask` — the attention mask restricted to the kept tokens (rows and columns).
* :func:`scatter_tokens` — per-token outputs back at their original positions; pruned
  positions get the mean of the kept real tokens of their row.
* :func:`merge_tokens` — ToMe bipartite soft matching (Bolya et al., 2023) with token sizes.
"""
from __future__ import annotations

import torch

_NEG = -1.0e4  # "never": below any cosine similarity or attention score


def kept_count(seq_len, num: int, den: int):
    """ceil(seq_len * num / den) in integer arithmetic, so symbolic lengths stay exact."""
    return (seq_len * num + den - 1) // den


def key_validity(mask, batch: int, seq_len: int, last_query: bool) -> torch.Tensor:
    """bool [B, S]: the keys a query may attend to (all queries, or the last one)."""
    if mask is None:
        return torch.ones((batch, seq_len), dtype=torch.bool)
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    allowed = allowed.expand(batch, -1, -1, seq_len)
    if last_query:
        return allowed[:, :, -1, :].any(dim=1)
    return allowed.any(dim=2).any(dim=1)


def attention_received(q: torch.Tensor, k, mask, scale: float, is_causal: bool,
                       last_query: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores float [B, S], valid bool [B, S]): attention each key receives.

    ``k`` None: ``q`` already holds the attention probabilities [B, H, S_q, S] (eager attention).
    """
    B, H, S_q = q.shape[:3]
    if k is None:
        probs, S = q.float(), q.shape[3]
    else:
        S = k.shape[2]
        if k.shape[1] != H:  # grouped-query attention: each kv head serves H / H_kv query heads
            k = k.repeat_interleave(H // k.shape[1], dim=1)
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
        if is_causal:
            causal = torch.ones((S_q, S), dtype=torch.bool, device=q.device).tril()
            logits = logits.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a fully masked row attends nowhere
    valid = key_validity(mask, B, S, last_query).to(q.device)
    if is_causal and mask is None and not last_query:
        valid = torch.ones((B, S), dtype=torch.bool, device=q.device)
    if last_query:
        return probs[:, :, -1, :].mean(dim=1), valid
    query_weight = valid.to(probs.dtype)[:, None, :, None]  # padding queries do not vote
    received = (probs * query_weight).sum(dim=2).mean(dim=1)
    return received / query_weight.sum(dim=2).mean(dim=1).clamp_min(1.0), valid


def select_tokens(scores: torch.Tensor, valid: torch.Tensor, num: int, den: int, keep_first: bool,
                  keep_last: bool) -> torch.Tensor:
    """int64 [B, ceil(S*num/den)]: kept positions, ascending; padding never outranks a real token."""
    S = scores.shape[1]
    # Rank: forced tokens (2) > real tokens by score (0..1) > padding (-1); scores are probabilities.
    rank = torch.where(valid, scores.float().clamp(0.0, 1.0), torch.full_like(scores, -1.0, dtype=torch.float32))
    position = torch.arange(S, device=scores.device)
    forced = torch.zeros((S,), dtype=torch.bool, device=scores.device)
    if keep_first:
        forced = forced | (position == 0)
    if keep_last:
        forced = forced | (position == S - 1)
    rank = torch.where(forced[None, :], torch.full_like(rank, 2.0), rank)
    top = torch.topk(rank, kept_count(S, num, den), dim=1).indices
    return torch.sort(top, dim=1).values


def gather_mask(mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The mask [B|1, H|1, S|1, S] on the kept tokens: [B, H|1, K|1, K]."""
    B, K = index.shape
    mask = mask.expand(B, -1, -1, -1)
    heads, rows = mask.shape[1], mask.shape[2]
    cols = index[:, None, None, :].expand(B, heads, rows, K)
    out = torch.gather(mask, 3, cols)
    if rows == 1:
        return out
    return torch.gather(out, 2, index[:, None, :, None].expand(B, heads, K, K))


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B|1, S, D] -> [B, K, D] (the token-gather kernel's math, batch-1 inputs broadcast)."""
    B, K = index.shape
    x = x.expand(B, -1, -1)
    return torch.gather(x, 1, index[:, :, None].expand(B, K, x.shape[2]))


def scatter_tokens(kept: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """kept [B, K, D] back to [B, S, D]; pruned positions hold the mean of the kept real tokens.

    With that fill, a mean over the original attention mask equals the mean over the kept real
    tokens (``sum_kept + n_pruned * mean_kept = n_real * mean_kept``), and position 0 is intact.
    """
    B, K, D = kept.shape
    S = valid.shape[1]
    kept_valid = torch.gather(valid, 1, index).to(kept.dtype)[:, :, None]
    mean = (kept * kept_valid).sum(dim=1, keepdim=True) / kept_valid.sum(dim=1, keepdim=True).clamp_min(1.0)
    out = mean.expand(B, S, D).contiguous()
    return torch.scatter(out, 1, index[:, :, None].expand(B, K, D), kept)


def merge_tokens(hidden: torch.Tensor, keys: torch.Tensor, size, valid, slot, mask, r: int, protect_first: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe bipartite soft matching: merge ``r`` tokens of every row into their most similar partner.

    hidden [B, S, D]; keys [B, H, S, Dh] (the block's attention keys: the similarity metric);
    size float [B, S] (tokens merged into each); valid bool [B, S]; slot int64 [B, S0] (for each
    original token, the position holding it now); at the first merge these three are None
    (sizes 1, validity from the attention ``mask``, slots the identity). Returns (hidden, size, valid, slot, mask) after
    the merge, S - r tokens; ``mask`` [B, 1, 1, S - r] is the additive proportional-attention mask. Alternate tokens form sets A and B; each A token's best B partner by
    key cosine; the r best edges merge (size-weighted average); the first token is never merged
    when ``protect_first``; padding merges only with padding.
    """
    B, S, D = hidden.shape
    if size is None:
        size = torch.ones((B, S), dtype=torch.float32, device=hidden.device)
        valid = key_validity(mask, B, S, last_query=False).to(hidden.device)
        slot = torch.arange(S, device=hidden.device).expand(B, S)
    metric = keys.float().mean(dim=1)
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    a, b = metric[:, 0::2], metric[:, 1::2]
    na = a.shape[1]
    similarity = a @ b.transpose(-1, -2)  # [B, na, nb] cosine in [-1, 1]
    va, vb = valid[:, 0::2], valid[:, 1::2]
    same = va[:, :, None] == vb[:, None, :]
    pads = (~va)[:, :, None] & (~vb)[:, None, :]
    similarity = torch.where(same, similarity, torch.full_like(similarity, _NEG / 2))
    similarity = torch.where(pads, torch.full_like(similarity, 2.0), similarity)  # padding merges first
    if protect_first:
        first = (torch.arange(na, device=hidden.device) == 0)[None, :, None]
        similarity = torch.where(first, torch.full_like(similarity, _NEG), similarity)
    best, partner = similarity.max(dim=-1)  # [B, na]
    order = best.argsort(dim=-1, descending=True)
    src = order[:, :r]  # A tokens merged away
    unmerged = order[:, r:].sort(dim=-1).values  # A tokens kept, in their original order
    dst = torch.gather(partner, 1, src)  # their B partners
    n_unm = na - r

    def take(x, idx):
        return torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[2]))

    size_a, size_b = size[:, 0::2, None], size[:, 1::2, None]
    xa, xb = hidden[:, 0::2] * size_a, hidden[:, 1::2] * size_b  # sums, divided by sizes below
    merged_sum = torch.scatter_add(xb, 1, dst[:, :, None].expand(-1, -1, D), take(xa, src))
    merged_size = torch.scatter_add(size_b, 1, dst[:, :, None], take(size_a, src))
    out_sum = torch.cat([take(xa, unmerged), merged_sum], dim=1)
    out_size = torch.cat([take(size_a, unmerged), merged_size], dim=1)
    out_valid = torch.cat([torch.gather(va, 1, unmerged), vb], dim=1)

    # New position of every current token: kept A -> its rank, merged A -> n_unm + partner, B j -> n_unm + j.
    pos_a = torch.zeros_like(partner)
    pos_a = torch.scatter(pos_a, 1, unmerged, torch.arange(n_unm, device=hidden.device).expand(B, n_unm))
    pos_a = torch.scatter(pos_a, 1, src, dst + n_unm)
    pos_b = torch.arange(na, device=hidden.device).expand(B, -1) + n_unm  # one spare column when S is odd
    new_pos = torch.stack([pos_a, pos_b], dim=2).reshape(B, 2 * na)[:, :S]
    out_size = out_size[:, :, 0]
    # Proportional attention: softmax(q k^T / sqrt(d) + log(size)) counts a merged token once per source.
    mask = torch.where(out_valid, out_size.log(), torch.full_like(out_size, float("-inf")))[:, None, None, :]
    return ((out_sum / out_size[:, :, None]).to(hidden.dtype), out_size, out_valid, torch.gather(new_pos, 1, slot),
            mask.to(hidden.dtype))
