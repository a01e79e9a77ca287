"""Token selection and merging math: pure-torch references of the rarefy token ops.

Every function here is branch-free on data (no ``.item()``, no data-dependent shapes), so
the same code is the eager reference, the fake-shape rule's source, and, traced by
``torch.export``, the ONNX lowering (TopK, GatherElements, ScatterElements, Softmax, ...).

Shapes: ``hidden`` [B, S, D]; ``q``/``k`` [B, H, S, Dh] (``k`` may have fewer heads:
grouped-query attention; or ``k`` None and ``q`` the probabilities of an eager attention); ``mask`` None, bool (True = attend) or additive float, broadcast
to [B, 1 or H, S_q, S]; ``valid`` bool [B, S] (False = padding); ``index`` int64 [B, K].

* :func:`attention_received` — Zero-TPrune / EViT / FastV token scores: the attention each
  key receives, mean over heads and (real) queries, or from [CLS] (EViT) or the last query only.
* :func:`select_tokens` — top ``ceil(S * num / den)`` tokens per row, padding ranked last,
  the first and/or last token always kept, indices in ascending order.
* :func:`gather_mask` — the attention mask restricted to the kept tokens (rows and columns).
* :func:`scatter_tokens` — per-token outputs back at their original positions; pruned
  positions get the mean of the kept real tokens of their row.
* :func:`fuse_pruned` — EViT inattentive-token fusion (Liang et al., 2022): the pruned real
  tokens of a row averaged into one extra token that carries their count as its size.
* :func:`fused_mask` — the mask on the kept tokens plus the fused token, additive, with
  proportional attention (``+ log size``) on the fused token's column.
* :func:`scatter_fused` — per-token outputs back at their original positions; pruned
  positions hold the fused token's final state.
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
                       last_query: bool, first_query: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores float [B, S], valid bool [B, S]): attention each key receives.

    Mean over heads and real queries (Zero-TPrune), or from the last query only (FastV), or from
    the first query, [CLS], only (``first_query``: EViT). ``k`` None: ``q`` already holds the
    attention probabilities [B, H, S_q, S] (eager attention).
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
    if first_query:
        return probs[:, :, 0, :].mean(dim=1), valid
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


def fuse_pruned(hidden: torch.Tensor, index: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor,
                weighted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused [B, 1, D], size [B, K + 1] in hidden's dtype): EViT's fusion of the pruned real tokens.

    ``fused`` is the average of the pruned real tokens of the row, weighted by their attention
    scores (``weighted``, as EViT) or uniform; ``size`` is 1 for the K kept tokens and the
    number of pruned real tokens for the fused one (0 when none: it is then masked out).
    """
    B, S, D = hidden.shape
    K = index.shape[1]
    kept = torch.zeros((B, S), dtype=torch.float32, device=hidden.device).scatter(
        1, index, torch.ones((B, K), dtype=torch.float32, device=hidden.device))
    pruned = (1.0 - kept) * valid.to(torch.float32)  # padding is dropped, never fused
    weight = pruned * scores.float().clamp_min(1e-12) if weighted else pruned
    fused = torch.matmul(weight[:, None, :], hidden.float()) / weight.sum(dim=1).clamp_min(1e-12)[:, None, None]
    size = torch.cat([torch.ones((B, K), dtype=torch.float32, device=hidden.device),
                      pruned.sum(dim=1, keepdim=True)], dim=1)
    return fused.to(hidden.dtype), size.to(hidden.dtype)


def fused_mask(mask, index: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Additive mask [B, H|1, K+1|1, K+1] on the kept tokens and the fused one (size's dtype).

    Proportional attention (ToMe): a key of size n gets ``+ log n`` (0 for kept tokens), so the
    fused token is attended as much as the n tokens it stands for; size 0 gives -inf (no key).
    The fused token queries like the first kept token ([CLS]): its row is a copy of row 0.
    """
    B, K = index.shape
    low = torch.finfo(size.dtype).min
    column = torch.where(size > 0, size.clamp_min(1e-12).log(), torch.full_like(size, low))[:, None, None, :]
    if mask is None:
        return column
    kept = gather_mask(mask, index)
    allowed = kept if kept.dtype == torch.bool else kept > torch.finfo(kept.dtype).min / 2
    if allowed.shape[2] != 1:
        allowed = torch.cat([allowed, allowed[:, :, :1, :]], dim=2)
    allowed = torch.cat([allowed, torch.ones_like(allowed[..., :1])], dim=3)
    return torch.where(allowed, column, torch.full_like(column, low))


def scatter_fused(out: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """out [B, K+1, D] (kept tokens, then the fused one) back to [B, S, D]; pruned positions read
    the fused token, so a mean over the original mask is the size-weighted mean of the K+1 tokens."""
    B, K = index.shape
    D = out.shape[2]
    full = out[:, -1:].expand(B, valid.shape[1], D).contiguous()
    return torch.scatter(full, 1, index[:, :, None].expand(B, K, D), out[:, :-1])


def merge_tokens(hidden: torch.Tensor, keys: torch.Tensor, size, valid, slot, mask, r: int, protect_first: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe bipartite soft matching: merge ``r`` tokens of every row into their most similar partner.

    hidden [B, S, D]; keys [B, H, S, Dh] (the block's attention keys: the similarity metric);
    size float [B, S] (tokens merged into each); valid bool [B, S]; slot int64 [B, S0] (for each
    original token, the position holding it now); at the first merge these three are None
    (sizes 1, validity from the attention ``mask``, slots the identity). Returns (hidden, size, valid, slot, mask)
    after the merge, S - r tokens in their original order; ``mask`` [B, 1, 1, S - r] is the additive
    proportional-attention mask. Alternate tokens form sets A (even positions) and B (odd); each A
    token's best B partner by key cosine; the r best edges merge (size-weighted average); the first
    token is never merged when ``protect_first``; padding merges only with padding.
    """
    B, S, D = hidden.shape
    if size is None:
        size = torch.ones((B, S), dtype=torch.float32, device=hidden.device)
        valid = key_validity(mask, B, S, last_query=False).to(hidden.device)
        slot = torch.arange(S, device=hidden.device).expand(B, S)
    # Every shape below is S or the output's S - r: no strided halves (S+1)//2, S//2 whose floor
    # expressions nest merge after merge and stall torch.export's symbolic solver at ONNX export.
    metric = keys.float().mean(dim=1)
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    similarity = metric @ metric.transpose(-1, -2)  # [B, S, S] cosine in [-1, 1]; rows A, columns B used
    position = torch.arange(S, device=hidden.device)
    is_a = position % 2 == 0  # set A: even positions, set B: odd ones
    same = valid[:, :, None] == valid[:, None, :]
    pads = (~valid)[:, :, None] & (~valid)[:, None, :]
    similarity = torch.where(same, similarity, torch.full_like(similarity, _NEG / 2))
    similarity = torch.where(pads, torch.full_like(similarity, 2.0), similarity)  # padding merges first
    if protect_first:
        similarity = torch.where((position == 0)[None, :, None], torch.full_like(similarity, _NEG), similarity)
    similarity = torch.where(is_a[None, None, :], torch.full_like(similarity, 4 * _NEG), similarity)  # B columns
    best, partner = similarity.max(dim=-1)  # [B, S]: each A token's best B partner
    best = torch.where(is_a[None, :], best, torch.full_like(best, 8 * _NEG))  # B tokens are never sources
    src = torch.topk(best, r, dim=1).indices  # the r A tokens merged away
    dst = torch.gather(partner, 1, src)  # their B partners

    xs = hidden.float() * size[:, :, None]  # sums, divided by sizes below
    merged_sum = torch.scatter_add(xs, 1, dst[:, :, None].expand(-1, -1, D),
                                   torch.gather(xs, 1, src[:, :, None].expand(-1, -1, D)))
    merged_size = torch.scatter_add(size, 1, dst, torch.gather(size, 1, src))
    kept = torch.ones((B, S), dtype=torch.float32, device=hidden.device).scatter(
        1, src, torch.zeros((B, r), dtype=torch.float32, device=hidden.device))
    # The S - r survivors in their original order: top-(S - r) of -position among the kept.
    order = torch.where(kept > 0, -position.to(torch.float32)[None, :], torch.full_like(kept, 2.0 * -S - 2.0))
    survivors = torch.topk(order, S - r, dim=1).indices
    out_sum = torch.gather(merged_sum, 1, survivors[:, :, None].expand(-1, -1, D))
    out_size = torch.gather(merged_size, 1, survivors)
    out_valid = torch.gather(valid, 1, survivors)
    # New position of every current token: a survivor's rank among survivors, a merged one its partner's.
    rank = torch.cumsum(kept, dim=1).to(torch.int64) - 1
    new_pos = torch.where(kept > 0, rank, torch.gather(rank, 1, partner))
    # Proportional attention: softmax(q k^T / sqrt(d) + log(size)) counts a merged token once per source.
    mask = torch.where(out_valid, out_size.log(), torch.full_like(out_size, float("-inf")))[:, None, None, :]
    return ((out_sum / out_size[:, :, None]).to(hidden.dtype), out_size, out_valid, torch.gather(new_pos, 1, slot),
            mask.to(hidden.dtype))
