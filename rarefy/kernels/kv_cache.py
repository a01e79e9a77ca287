"""Reference math of the KV-cache ops (``rarefy::cache_*``, ``kivi_*``, ``evict_*``), pure torch.

Every function here is branch-free over tensor values (no ``.item()``, no data-dependent
shapes), so it is at once the torch reference of its op, the CPU fallback of the Triton
backend and, traced by ``torch.export``, its ONNX lowering (standard ONNX operators).

Conventions of one decode step of one layer (``T`` new tokens at positions
``cache_position = [L0, L0 + T)``, the same for every batch row):
    q            [B, H_q, T, Dh]   queries (after RoPE)
    k_new, v_new [B, H_kv, T, Dh]  keys (after RoPE, so a cached key never needs re-rotating) / values
    attention output [B, T, H_q, Dh] (Hugging Face's layout after attention)
The new chunk attends to itself causally in full precision and to the *past* (positions
< L0) through the cache, whatever its layout. Writes to a slot that several tokens of one
chunk may map to (a ring, a key group, an eviction) are gathers (``slot <- new token`` where
one exists, else unchanged), so tokens that fall out of a window in the same chunk cannot
race; KIVI's per-position value slots are scattered (one position, one slot).

Layouts:
* dense: ``k, v [B, H_kv, C, Dh]``; slot = position.
* KIVI (Liu et al. 2024): values per token, quantized as they arrive, slot = position;
  keys per channel over groups of ``G`` tokens, quantized a whole group at a time once it
  leaves the full-precision window: positions ``< Q(L) = max(0, floor((L - R) / G)) * G``
  are read from the codes, the rest from an fp ring of ``W = R + G`` keys (slot =
  position mod W); their values from a value ring of W slots too when ``R > 0``, else from
  their codes (``v_ring`` None). Codes/scales use the packed layouts of ``kivi.py``.
* eviction (H2O, SnapKV, StreamingLLM): ``k, v [B, H_kv, C, Dh]`` hold any C tokens,
  ``slot_pos [B, H_kv, C]`` int64 their positions (-1 empty), ``score [B, H_kv, C]`` fp32
  the method's priority. A write keeps the C best of the C + T candidates (old slots and
  new tokens) with ``topk``: forced ones (sinks, recent window) first, then by score.
"""
from __future__ import annotations

import torch

from .kivi import _check_bits_group

__all__ = [
    "cache_attention", "cache_write", "kivi_attention", "kivi_write", "quantized_count", "evict_attention",
    "evict_write", "evict_quant_attention", "evict_quant_write", "EVICTION_METHODS", "cache_attention_triton", "kivi_attention_triton",
]

EVICTION_METHODS = ("h2o", "snapkv", "streaming")


# -- shared pieces ---------------------------------------------------------------------------
def attend(q, k_past, v_past, past_valid, k_new, v_new, scale: float):
    """Attention of the new chunk over (valid past slots) + (itself, causally).

    ``past_valid`` broadcasts to [B, H_kv, S]. Returns (out [B, T, H_q, Dh], probs
    [B, H_kv, rep, T, S + T] in fp32).
    """
    B, Hq, T, D = q.shape
    H = k_new.shape[1]
    rep = Hq // H
    S = k_past.shape[2]
    k = torch.cat([k_past.to(q.dtype), k_new], dim=2).unsqueeze(2)  # [B, H, 1, S+T, D]
    v = torch.cat([v_past.to(q.dtype), v_new], dim=2).unsqueeze(2)
    t = torch.arange(T, device=q.device)
    causal = t[None, :] <= t[:, None]
    valid = torch.cat([past_valid[..., None, :].expand(B, H, T, S), causal.expand(B, H, T, T)], dim=-1)
    # query head h reads kv head h // rep (Hugging Face repeat_kv)
    scores = torch.matmul(q.reshape(B, H, rep, T, D), k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~valid[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    out = torch.matmul(probs.to(q.dtype), v)  # [B, H, rep, T, D]
    return out.reshape(B, Hq, T, D).transpose(1, 2).contiguous(), probs


def write_slots(cache: torch.Tensor, new: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``cache[:, :, s] = new[:, :, source[s]]`` where ``source[s] >= 0``, else unchanged (dim 2)."""
    picked = new.index_select(2, source.clamp(min=0)).to(cache.dtype)
    keep = (source < 0).view(1, 1, -1, *([1] * (cache.dim() - 3)))
    return torch.where(keep, cache, picked)


def gather_into(cache: torch.Tensor, new: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``write_slots`` over the S = ``len(source)`` equal slots of each head (``cache`` [B, H, ...]),
    ``new`` [B, H * n, ...] holding n slots per head, as one gather from their concatenation: no
    ``where`` over the state (ONNX Runtime's CPU Where has no fp16 kernel and casts around it), and
    n shares a dim with the heads, so it is never a dim of its own (torch.export specialises a dim
    that is 1 when traced, and the ONNX model would declare it static)."""
    B, H, slots = cache.shape[0], cache.shape[1], source.shape[0]
    both = torch.cat([cache.reshape(B, H * slots, -1), new.reshape(B, new.shape[1], -1).to(cache.dtype)], dim=1)
    head = torch.arange(H, device=cache.device)[:, None]
    index = torch.where(source >= 0, H * slots + head * (new.shape[1] // H) + source,
                        head * slots + torch.arange(slots, device=cache.device))
    return both.index_select(1, index.reshape(-1)).reshape(cache.shape)


def scatter_positions(cache: torch.Tensor, new: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """``cache[:, :, cache_position[t]] = new[:, :, t]`` (dim 2), one ScatterElements in ONNX: only the
    chunk's slots are written. Positions past the cache are an error, not dropped."""
    index = cache_position.view(1, 1, -1, *[1] * (new.dim() - 3)).expand(new.shape)
    return cache.scatter(2, index, new.to(cache.dtype))


def _start(cache_position: torch.Tensor) -> torch.Tensor:
    return cache_position[:1]


# -- KIVI layouts in fp32 arithmetic on exact small integers (ONNX Runtime has no uint8 BitwiseAnd) --
def _quantize_pack(x: torch.Tensor, bits: int, dim: int, scale_dtype):
    """``kivi._quantize_groups`` of the groups lying along ``dim``, packed LSB-first along ``dim``
    (``kivi.pack_codes``): (uint8 codes, scale, zero), scale and zero keeping ``dim`` with size 1.

    Same values as kivi.py in fewer ONNX operators: no transposes, and the codes are packed while
    still fp32 (exact small integers), so no integer casts.
    """
    qmax, per_byte = 2 ** bits - 1, 8 // bits
    xf = x.float()
    mn = xf.amin(dim=dim, keepdim=True)
    scale = ((xf.amax(dim=dim, keepdim=True) - mn) / qmax).to(scale_dtype)
    zero = mn.to(scale_dtype)
    s = scale.float()
    # a constant group has scale 0: every code is 0 and x_hat = zero exactly
    codes = torch.round((xf - zero.float()) / torch.where(s > 0, s, 1.0)).clamp(0, qmax)
    weights = (2.0 ** (bits * torch.arange(per_byte, device=x.device))).view(per_byte, *[1] * (-1 - dim))
    packed = (codes.unflatten(dim, (codes.shape[dim] // per_byte, per_byte)) * weights).sum(dim)
    return packed.to(torch.uint8), scale, zero


def _byte_floors(packed: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """``u_j = floor(byte / 2**(bits*j))`` for j < 8 // bits, in fp32 (exact: bytes are < 256).

    Code j of a byte is ``u_j - 2**bits * u_{j+1}`` (``u_P = 0``), and that is linear, so a
    product with the codes is ``X(u_j) - 2**bits * X(u_{j+1})`` (:func:`_codes_of`): the codes
    are never unpacked one by one. A cast, a scale and a truncating cast to int32 and back (the
    floor of a value >= 0) are the cheapest unpack ONNX Runtime runs: its Floor is ~1.4x slower
    than the two casts, there is no uint8 BitwiseAnd, and int32 Div/Mod is ~15x slower on CPU.
    """
    f = packed.to(torch.float32)
    return [f] + [(f * 2.0 ** (-bits * j)).to(torch.int32).to(torch.float32) for j in range(1, 8 // bits)]


def _codes_of(floors: list[torch.Tensor], bits: int) -> list[torch.Tensor]:
    """Code j (or a linear map of it) from the byte floors ``u_j`` (or the same map of them)."""
    last = len(floors) - 1
    return [floors[j] - 2 ** bits * floors[j + 1] if j < last else floors[j] for j in range(last + 1)]


def _unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """``kivi.unpack_codes`` as float codes (code j of a byte is the LSB-first j-th)."""
    p = packed.movedim(dim, -1)
    codes = torch.stack(_codes_of(_byte_floors(p, bits), bits), dim=-1)
    return codes.reshape(*p.shape[:-1], p.shape[-1] * (8 // bits)).movedim(-1, dim)


def quantize_values(v, bits: int, group_size: int, scale_dtype):
    """Per-token values over groups of channels; as ``kivi.quantize_values``."""
    _check_bits_group(bits, group_size)
    *lead, t, d = v.shape
    codes, scale, zero = _quantize_pack(v.reshape(*lead, t, d // group_size, group_size), bits, -1, scale_dtype)
    return codes.reshape(*lead, t, d * bits // 8), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_values(codes, scale, zero, bits: int, group_size: int, dtype):
    *lead, t, cols = codes.shape
    c = _unpack(codes, bits, -1).reshape(*lead, t, cols * 8 // bits // group_size, group_size)
    return (c * scale.float()[..., None] + zero.float()[..., None]).reshape(*lead, t, -1).to(dtype)


# -- dense cache -----------------------------------------------------------------------------
def cache_attention(q, k_new, v_new, k_cache, v_cache, cache_position, scale: float):
    """Dense static cache: slot j holds position j, valid while j < L0."""
    past_valid = torch.arange(k_cache.shape[2], device=q.device) < _start(cache_position)
    return attend(q, k_cache, v_cache, past_valid, k_new, v_new, scale)[0]


def cache_write(k_cache, v_cache, k_new, v_new, cache_position):
    """Write the chunk at slots [L0, L0 + T)."""
    source = torch.arange(k_cache.shape[2], device=k_cache.device) - _start(cache_position)
    source = torch.where(source < k_new.shape[2], source, -1)
    return write_slots(k_cache, k_new, source), write_slots(v_cache, v_new, source)


# -- KIVI ------------------------------------------------------------------------------------
def quantized_count(length: torch.Tensor, residual: int, group_size: int) -> torch.Tensor:
    """Q(L): how many leading positions have quantized keys once L tokens are cached."""
    return torch.div(length - residual, group_size, rounding_mode="floor").clamp(min=0) * group_size


def _ring_positions(length: torch.Tensor, ring: int, device) -> torch.Tensor:
    """Position held by each ring slot once ``length`` tokens were written (negative: never)."""
    s = torch.arange(ring, device=device)
    return length - 1 - torch.remainder(length - 1 - s, ring)


def kivi_attention(q, k_new, v_new, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_ring, v_ring,
                   cache_position, scale: float, bits: int, group_size: int, residual: int):
    """Attention over positions [0, Q(L0)) from the codes, [Q(L0), L0) from the fp ring (values from
    their codes when there is no value ring), and the chunk itself causally.

    The codes are never dequantized to a cache-sized tensor: with ``k = c s + z`` per key group
    and ``v = c s + z`` per value group, ``q.k = (q * s).c + q.z`` and ``p.v = (p * s).c + p.z``,
    so the scales fold into the (small) query and probabilities and each packed byte enters
    the two products through :func:`_byte_floors` (casts and a scale per code).
    """
    B, Hq, T, D = q.shape
    H, C, W = k_new.shape[1], v_codes.shape[2], k_ring.shape[2]
    rep, G, per_byte = Hq // H, group_size, 8 // bits
    rows = rep * T  # query rows of a kv head: (repeat, token), token inner
    start = _start(cache_position)
    q0 = quantized_count(start, residual, G)
    qf = q.float().reshape(B, H, rows, D)
    # keys: [B, H, C/G groups, rows, D] query scaled per group (channels innermost: a cheap broadcast),
    # then one product per code of a byte, tokens innermost so that the zero points' bias broadcasts
    # along the last dim (ONNX Runtime's fast path: along a middle dim it took ~20% of this attention)
    q_scaled = k_scale.float()[:, :, :, None] * qf[:, :, None]
    floors = _byte_floors(k_codes.reshape(B, H, C // G, G // per_byte, D), bits)
    codes_q = _codes_of([torch.matmul(q_scaled, u.transpose(-1, -2)) for u in floors], bits)  # [B, H, C/G, rows, G/P]
    k_bias = torch.matmul(k_zero.float(), qf.transpose(-1, -2))  # [B, H, C/G, rows]
    s_quant = torch.stack(codes_q, dim=-1).reshape(B, H, C // G, rows, G) + k_bias[..., None]  # token = byte * P + code
    s_quant = s_quant.transpose(2, 3).reshape(B, H, rows, C)
    s_ring = torch.matmul(qf, k_ring.float().transpose(-1, -2))
    s_new = torch.matmul(qf, k_new.float().transpose(-1, -2))
    scores = torch.cat([s_quant, s_ring, s_new], dim=-1) * scale  # [B, H, rows, C + W + T]
    ring_pos = _ring_positions(start, W, q.device)
    slot = torch.arange(C, device=q.device)
    t = torch.arange(T, device=q.device)
    valid = torch.cat([(slot < q0).expand(rows, C), ((ring_pos >= q0) & (ring_pos >= 0)).expand(rows, W),
                       (t[None, :] <= t[:, None]).repeat(rep, 1)], dim=-1)
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    p_quant, p_ring, p_new = probs.split([C, W, T], dim=-1)
    out = torch.matmul(p_new, v_new.float())
    if v_ring is not None:
        out = out + torch.matmul(p_ring, v_ring.float())
    else:  # ring positions' values come from their codes: ring slot of position j is j mod W
        in_ring = (slot >= q0) & (slot < start)
        tiled = p_ring.repeat(1, 1, 1, -(-C // W))[..., :C]  # a tile, not a gather: ~5x cheaper in ORT
        p_quant = p_quant + torch.where(in_ring, tiled, 0.0)
    # values: [B, H, D/G groups, rows, C] probabilities scaled per group, one product per code
    groups = D // G
    p_scaled = v_scale.float().transpose(-1, -2)[:, :, :, None] * p_quant[:, :, None]
    v_bytes = v_codes.reshape(B, H, C, groups, G // per_byte)
    v_bytes = v_bytes.transpose(2, 3) if groups > 1 else v_bytes.reshape(B, H, 1, C, G // per_byte)
    codes_p = _codes_of([torch.matmul(p_scaled, u) for u in _byte_floors(v_bytes, bits)], bits)
    v_out = torch.stack(codes_p, dim=-1).reshape(B, H, groups, rows, G)  # channel = byte * P + code
    v_out = v_out + torch.matmul(p_quant, v_zero.float()).transpose(-1, -2)[..., None]
    out = out + v_out.transpose(2, 3).reshape(B, H, rows, D)
    return out.reshape(B, Hq, T, D).transpose(1, 2).contiguous().to(q.dtype)


def kivi_write(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_ring, v_ring, k_new, v_new,
               cache_position, bits: int, group_size: int, residual: int):
    """Append the chunk: values quantized per token, both into the fp ring(s), whole key groups
    that left the window quantized per channel. Returns the state tensors (7 without a value ring).

    Lowered to ONNX, a step quantizes only its own tokens and the key groups they may complete,
    and writes them with one ScatterElements (value slots) or one Gather (rings, key groups) per
    state tensor: nothing runs over the cache but those copies.
    """
    G, T = group_size, k_new.shape[2]
    ring = k_ring.shape[2]
    start = _start(cache_position)
    end = start + T
    # values: per token, at slot = position
    vc, vs, vz = quantize_values(v_new, bits, G, scale_dtype=v_scale.dtype)
    v_codes, v_scale, v_zero = (scatter_positions(v_codes, vc, cache_position),
                                scatter_positions(v_scale, vs, cache_position),
                                scatter_positions(v_zero, vz, cache_position))
    # key groups [Q(L0), Q(L)) are complete: read them from old ring + chunk, quantize, store
    q0, q1 = quantized_count(start, residual, G), quantized_count(end, residual, G)
    n_groups = (T + G - 1) // G  # floor(x + T/G) - floor(x) <= ceil(T/G)
    pos = q0 + torch.arange(n_groups * G, device=k_new.device)
    source_w = torch.where(pos < start, torch.remainder(pos, ring), ring + pos - start).clamp(0, ring + T - 1)
    window = torch.cat([k_ring.to(k_new.dtype), k_new], dim=2).index_select(2, source_w)
    B, H, _, D = window.shape
    groups = window.reshape(B, -1, D).unflatten(1, (-1, G))  # [B, H * n_groups, G, D]: no n_groups dim
    kc, ks, kz = _quantize_pack(groups, bits, -2, k_scale.dtype)
    g = torch.arange(k_scale.shape[2], device=k_new.device)
    j = g - torch.div(q0, G, rounding_mode="floor")
    group_source = torch.where((j >= 0) & (j < n_groups) & (g * G < q1), j, -1)
    k_codes, k_scale, k_zero = (gather_into(k_codes, kc, group_source), gather_into(k_scale, ks, group_source),
                                gather_into(k_zero, kz, group_source))
    # fp ring(s): the last W positions
    ring_pos = _ring_positions(end, ring, k_new.device)
    ring_source = torch.where(ring_pos >= start, ring_pos - start, -1)
    state = (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, gather_into(k_ring, k_new.flatten(1, 2), ring_source))
    return state if v_ring is None else (*state, gather_into(v_ring, v_new.flatten(1, 2), ring_source))


# -- eviction --------------------------------------------------------------------------------
def evict_attention(q, k_new, v_new, k_cache, v_cache, slot_pos, cache_position, scale: float,
                    observation: int):
    """Attention over the kept slots and the chunk; also the votes every candidate got.

    votes [B, H_kv, C + T] fp32: attention probability received, summed over the query
    heads of a kv head and over the last ``observation`` queries of the chunk (0: all).
    """
    out, probs = attend(q, k_cache, v_cache, slot_pos >= 0, k_new, v_new, scale)
    T = q.shape[2]
    t = torch.arange(T, device=q.device)
    weight = (t >= T - observation).to(probs.dtype) if observation > 0 else torch.ones_like(t, dtype=probs.dtype)
    votes = (probs * weight[:, None]).sum(dim=(2, 3))
    return out, votes


def evict_write(k_cache, v_cache, slot_pos, score, k_new, v_new, votes, cache_position, method: str,
                sinks: int, window: int, pool: int):
    """Keep the C best of the C + T candidates; returns (k, v, slot_pos, score)."""
    keep, kept_pos, kept_score = select_slots(slot_pos, score, votes, cache_position, method, sinks, window, pool)
    return gather_slots(k_cache, k_new, keep), gather_slots(v_cache, v_new, keep), kept_pos, kept_score


def select_slots(slot_pos, score, votes, cache_position, method: str, sinks: int, window: int, pool: int):
    """Which C of the C + T candidates (old slots, then new tokens) stay: (keep, positions, scores)."""
    B, H, C = slot_pos.shape
    T = cache_position.shape[0]
    end = cache_position[-1:] + 1
    cand_pos = torch.cat([slot_pos, cache_position.view(1, 1, T).expand(B, H, T)], dim=2)
    valid = cand_pos >= 0
    if method == "h2o":  # accumulated attention: heavy hitters (Zhang et al. 2023)
        priority = torch.cat([score, torch.zeros_like(votes[..., C:])], dim=2) + votes
    elif method == "snapkv":  # observation-window votes, pooled over neighbouring positions (Li et al. 2024)
        priority = _pool_by_position(votes, cand_pos, pool)
    elif method == "streaming":  # attention sinks + most recent (Xiao et al. 2024)
        priority = cand_pos.to(votes.dtype)
    else:
        raise ValueError(f"unknown eviction method {method!r}; choose one of {EVICTION_METHODS}")
    forced = (cand_pos >= end - window) | (cand_pos < sinks)
    rank = torch.where(forced, torch.full_like(priority, float("inf")), priority)
    rank = torch.where(valid, rank, torch.full_like(priority, float("-inf")))
    # ties (pooled votes make plateaus) go to the newer token, the same on every backend
    keep = torch.topk(rank.double() + cand_pos.double() * 1e-9, C, dim=2).indices
    return keep, torch.gather(cand_pos, 2, keep), torch.gather(priority, 2, keep)


def gather_slots(old: torch.Tensor, new: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Rows ``keep`` [B, H, C] of cat(old, new) along dim 2 (any trailing dims)."""
    trailing = old.shape[3:]
    index = keep.view(*keep.shape, *([1] * len(trailing))).expand(*keep.shape, *trailing)
    return torch.gather(torch.cat([old, new.to(old.dtype)], dim=2), 2, index)


# -- eviction + quantization: per-token codes (a kept slot keeps its own groups) ------------------
def evict_quant_attention(q, k_new, v_new, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, slot_pos,
                          cache_position, scale: float, observation: int, bits: int, group_size: int):
    """``evict_attention`` over slots stored as per-token codes (keys and values grouped along channels)."""
    k = dequantize_values(k_codes, k_scale, k_zero, bits, group_size, q.dtype)
    v = dequantize_values(v_codes, v_scale, v_zero, bits, group_size, q.dtype)
    return evict_attention(q, k_new, v_new, k, v, slot_pos, cache_position, scale, observation)


def evict_quant_write(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, slot_pos, score, k_new, v_new, votes,
                      cache_position, method: str, sinks: int, window: int, pool: int, bits: int, group_size: int):
    """``evict_write`` with the new tokens quantized per token before the kept slots are gathered."""
    keep, kept_pos, kept_score = select_slots(slot_pos, score, votes, cache_position, method, sinks, window, pool)
    new_k = quantize_values(k_new, bits, group_size, k_scale.dtype)
    new_v = quantize_values(v_new, bits, group_size, v_scale.dtype)
    stored = [gather_slots(old, new, keep) for old, new in zip((k_codes, k_scale, k_zero, v_codes, v_scale, v_zero),
                                                               (*new_k, *new_v))]
    return (*stored, kept_pos, kept_score)


def _pool_by_position(votes: torch.Tensor, cand_pos: torch.Tensor, pool: int) -> torch.Tensor:
    """Max-pool votes over candidates in position order (SnapKV's clustering), back in slot order."""
    if pool <= 1:
        return votes
    order = torch.argsort(cand_pos, dim=2)
    ranked = torch.gather(votes, 2, order)
    N = ranked.shape[2]
    half = pool // 2
    pad = torch.zeros_like(ranked[..., :1]).expand(-1, -1, half)  # votes are >= 0
    padded = torch.cat([pad, ranked, pad], dim=2)
    pooled = padded[..., :N]  # a max over shifted copies: max_pool1d(kernel=pool, stride=1), export-safe
    for offset in range(1, 2 * half + 1):
        pooled = torch.maximum(pooled, padded[..., offset:offset + N])
    return torch.gather(pooled, 2, torch.argsort(order, dim=2))


# -- Triton adapters (decode steps, T = 1) ------------------------------------------------------
def cache_attention_triton(q, k_new, v_new, k_cache, v_cache, cache_position, scale: float):
    """Dense cache through the Triton decode kernel; prefill (T > 1) uses the reference."""
    if q.shape[2] != 1:
        return cache_attention(q, k_new, v_new, k_cache, v_cache, cache_position, scale)
    from .decode_attention import decode_attention

    lengths = _start(cache_position).repeat(q.shape[0])  # the kernel reads lengths[b]: no stride-0 view
    out = decode_attention(q[:, :, 0].contiguous(), k_cache.contiguous(), None, None, v_cache.contiguous(),
                           None, None, k_new.contiguous(), v_new.contiguous(), bits=None, group_size=1,
                           scale=scale, lengths=lengths)
    return out[:, None]


def kivi_attention_triton(q, k_new, v_new, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_ring, v_ring,
                          cache_position, scale: float, bits: int, group_size: int, residual: int):
    """KIVI cache through the Triton decode kernel (packed codes dequantized in registers)."""
    args = (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_ring, v_ring, cache_position)
    if q.shape[2] != 1:
        return kivi_attention(q, k_new, v_new, *args, scale, bits, group_size, residual)
    from .decode_attention import decode_attention

    start = _start(cache_position)
    q0 = quantized_count(start, residual, group_size)
    ring_pos = _ring_positions(start, k_ring.shape[2], q.device)
    ring_valid = (ring_pos >= q0) & (ring_pos >= 0)
    mask = torch.cat([torch.arange(v_codes.shape[2], device=q.device) < q0, ring_valid,
                      torch.ones(1, dtype=torch.bool, device=q.device)])
    B = q.shape[0]
    if v_ring is not None:
        v_recent = v_ring
    else:  # no value ring: the ring positions' values from their codes (a ring's worth of rows)
        v_recent = dequantize_values(v_codes.index_select(2, ring_pos.clamp(min=0)), v_scale.index_select(
            2, ring_pos.clamp(min=0)), v_zero.index_select(2, ring_pos.clamp(min=0)), bits, group_size, q.dtype)
    out = decode_attention(q[:, :, 0].contiguous(), k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                           torch.cat([k_ring, k_new], dim=2), torch.cat([v_recent, v_new], dim=2),
                           bits=bits, group_size=group_size, scale=scale,
                           mask=mask[None].expand(B, -1).contiguous())
    return out[:, None]
