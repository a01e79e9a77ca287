"""KV-cache compression: ``CompressKV`` on decode steps from ``rf.capture_decoder``.

``method="quantize"`` — KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache"): keys per channel over groups of ``group_size`` tokens, values
per token over groups of ``group_size`` channels, 2 or 4 bits, asymmetric, with fp16 scales
and zero points (KIVI's storage; fp32 would double their cost). The keys of the newest,
incomplete group and at least ``residual`` more recent tokens (fewer than ``residual +
group_size`` in all) stay in a full-precision ring (fp16, KIVI's "full precision", when the
model is fp32); with ``residual > 0`` their values get a ring too, with ``residual = 0``
values are read from their codes as soon as they arrive. The state tensors are stored
packed (layouts in ``rarefy/kernels/kivi.py``), so the cache bytes really shrink.

Bytes per cached token, per layer and kv head (b bits, head dim D, G = ``group_size``,
R = ``residual``, C = capacity rounded up to G, fp16 ring):

    2 * D * b / 8                     packed key and value codes
  + 2 * 2 * D / G  +  2 * 2 * D / G   fp16 scale + zero: key groups (D per G tokens), value groups (D/G)
  + (R + G) * D * 2 * (2 if R else 1) / C   the fp ring(s), amortised over the capacity

against 2 * D * 4 for an fp32 cache. SmolLM2-135M (D = 64) at C = 1024, 4 bits: G = 64, R = 0
(the defaults) gives 64 + 8 + 8 = 80 bytes = 0.156x; G = 32, R = 0 84 bytes = 0.164x;
G = 32, R = 32 (KIVI's group with a short window) 96 bytes = 0.1875x. The ring is a fixed
cost, so at long contexts KIVI's own R = 128, G = 32 becomes cheap; at 1,024 tokens it is
not. On SmolLM2 (1,024 KJV tokens, teacher-forced) 4-bit G = 64, R = 0 costs +1.9% perplexity
(G = 32, R = 0: -0.6%); 2 bits need small groups and a window: G = 16, R = 128 +8.6% (0.195x),
G = 32, R = 32 +23%.

Eviction to ``token_budget`` tokens per layer and kv head (the cache capacity becomes the
token budget, every write keeps the best ``token_budget`` of old slots + new tokens; keys are
cached after RoPE, so a kept key never needs re-rotating). ``budget=`` is, as on every pass,
the verification budget (``{"min_sqnr_db": ...}``); the token count was called ``budget``
before and that spelling now raises an error that names ``token_budget``:
* ``h2o`` — Heavy-Hitter Oracle (Zhang et al. 2023): accumulated attention received, plus
  the ``window`` most recent tokens.
* ``snapkv`` — SnapKV (Li et al. 2024): votes of the last ``window`` queries of each chunk
  (the observation window at the end of the prompt at prefill; the newest query when
  decoding), max-pooled over ``pool`` neighbouring positions; the window itself is kept.
* ``streaming`` — StreamingLLM (Xiao et al. 2024): ``sinks`` first tokens plus the most
  recent ``token_budget - sinks``.

With ``bits``, an evicting cache is also quantized (quantization and eviction in one pass):
keys and values both per token over groups of ``group_size`` channels, because a kept slot
must keep its own quantization groups (KIVI's per-channel key groups span evictable tokens).

Each layer's cache ops (``rarefy::cache_attention`` / ``cache_write``) and state tensors
are swapped for the method's (``kivi_*`` / ``evict_*``, math in
``rarefy/kernels/kv_cache.py``). Compression methods do not stack on one layer: a layer
already compressed is skipped with its reason. Dialect: FX decode steps only.
"""
from __future__ import annotations

import torch

from ..ir.decoder import DecoderStep
from ..ir.errors import ArgumentError, RarefyError
from ..kernels.kivi import SUPPORTED_BITS
from ..kernels.kv_cache import EVICTION_METHODS
from . import args
from .base import Pass, PassResult
from .kv_rewrite import StateTensor, rewrite_layer

METHODS = ("quantize",) + EVICTION_METHODS


class CompressKV(Pass):
    """Compress the KV cache of a decode step: KIVI quantization or eviction to a token budget."""

    dialects = ("fx",)

    def __init__(self, method: str = "quantize", bits: int | None = None, token_budget: int | None = None,
                 group_size: int = 64, residual: int = 0, sinks: int | None = None, window: int | None = None,
                 pool: int = 7, *, targets=None, ignore=None, budget=None):
        if isinstance(budget, (int, float)) and not isinstance(budget, bool):  # the token count's old name
            raise ArgumentError(f"CompressKV: the token count per layer is token_budget={budget!r} now; budget= is "
                                f"the verification budget, as on every pass (e.g. {{'min_sqnr_db': 20}})")
        super().__init__(targets=targets, ignore=ignore, budget=budget)
        bits = args.integer(self.name, "bits", bits, optional=True)
        token_budget = args.integer(self.name, "token_budget", token_budget, optional=True)
        group_size = args.integer(self.name, "group_size", group_size)
        residual = args.integer(self.name, "residual", residual)
        sinks = args.integer(self.name, "sinks", sinks, optional=True)
        window = args.integer(self.name, "window", window, optional=True)
        pool = args.integer(self.name, "pool", pool)
        if method not in METHODS:
            raise RarefyError(f"CompressKV: unknown method {method!r}; choose one of {METHODS}")
        self.method, self.bits, self.token_budget = method, bits, token_budget
        self.group_size, self.residual, self.pool = group_size, residual, pool
        if method == "quantize":
            if bits not in SUPPORTED_BITS:
                raise RarefyError(f"CompressKV(method='quantize') needs bits in {SUPPORTED_BITS}, got {bits!r}")
            if token_budget is not None:
                raise RarefyError("CompressKV(method='quantize') takes no token_budget; list an eviction "
                                  "CompressKV pass for that")
            if group_size < 8 // bits or group_size & (group_size - 1):
                raise RarefyError(f"CompressKV: group_size={group_size} must be a power of two >= {8 // bits}")
            if residual < 0 or residual % group_size:
                raise RarefyError(f"CompressKV: residual={residual} must be a multiple of group_size={group_size}")
            return
        if bits is not None and (bits not in SUPPORTED_BITS or group_size & (group_size - 1) or group_size < 8 // bits):
            raise RarefyError(f"CompressKV(method={method!r}, bits={bits}): bits must be in {SUPPORTED_BITS} and "
                              f"group_size={group_size} a power of two >= {8 // bits}")
        if pool < 1 or pool % 2 == 0:
            raise RarefyError(f"CompressKV: pool={pool} must be an odd window of positions")
        if not isinstance(token_budget, int) or token_budget < 1:
            raise RarefyError(f"CompressKV(method={method!r}) needs token_budget=<tokens per layer>, "
                              f"got {token_budget!r}")
        self.sinks = sinks if sinks is not None else (4 if method == "streaming" else 0)
        default_window = {"h2o": token_budget // 2, "snapkv": min(32, token_budget),
                          "streaming": token_budget - self.sinks}[method]
        self.window = window if window is not None else default_window
        if self.sinks < 0 or self.window < 0 or token_budget < self.sinks + self.window:
            raise RarefyError(f"CompressKV: token_budget={token_budget} is smaller than sinks ({self.sinks}) + "
                              f"window ({self.window})")

    # -- checks before any work ------------------------------------------------------------------
    def requires(self, graph, ctx) -> None:
        decoder = graph.meta.get("decoder")
        if not isinstance(graph, DecoderStep) or decoder is None:
            raise RarefyError("CompressKV runs on a decode step with an explicit KV cache: capture the model with "
                              "rf.capture_decoder(model, max_cache_len=...), not rf.capture")
        capacity = decoder["capacity"]
        if self.method != "quantize" and self.token_budget > capacity:
            raise RarefyError(f"CompressKV: token_budget={self.token_budget} is larger than the cache "
                              f"(max_cache_len={capacity})")
        if self.bits is not None and decoder["head_dim"] % self.group_size:
            raise RarefyError(f"CompressKV: group_size={self.group_size} must divide the head dim "
                              f"{decoder['head_dim']} (values are grouped along channels); pass a smaller "
                              f"group_size, e.g. 32")

    # -- the rewrite -----------------------------------------------------------------------------
    def call(self, graph, ctx) -> PassResult:
        entries = graph.meta["kv_cache"]
        chosen, skipped = self.select([e["name"] for e in entries])
        notes = [f"{name}: skipped, {why}" for name, why in skipped.items()]
        stats = {"skipped_by_selector": len(skipped)}
        bytes_before = graph.cache_bytes()
        decoder = graph.meta["decoder"]
        done = 0
        for entry in entries:
            if entry["name"] not in chosen:
                continue
            if entry["method"] != "dense":
                notes.append(f"{entry['name']}: skipped, already compressed by {entry['method']}")
                stats["skipped_already_compressed"] = stats.get("skipped_already_compressed", 0) + 1
                continue
            if self.method == "quantize":
                self._quantize_layer(graph, entry, decoder)
            else:
                self._evict_layer(graph, entry, decoder)
            done += 1
        if not done:
            return PassResult(graph, False, stats, notes)
        if self.method != "quantize":
            decoder["max_tokens"] = None  # an evicting cache never runs out of slots
        stats[f"{self.method}_layers"] = done
        bytes_after = graph.cache_bytes()
        notes.append(f"cache bytes per sequence: {bytes_before} -> {bytes_after} "
                     f"({bytes_after / bytes_before:.3f}x)")
        return PassResult(graph, True, stats, notes, {"cache_bytes_before": bytes_before,
                                                      "cache_bytes_after": bytes_after})

    def _quantize_layer(self, graph, entry, decoder) -> None:
        G, bits, i = self.group_size, self.bits, entry["layer"]
        H, D = entry["num_kv_heads"], entry["head_dim"]
        capacity = -(-entry["capacity"] // G) * G  # whole key groups
        ring = self.residual + G
        fp = getattr(torch, decoder["dtype"])
        ring_dtype = torch.float16 if fp == torch.float32 else fp
        state = [StateTensor(f"k_codes_{i}", (H, capacity * bits // 8, D), torch.uint8),
                 StateTensor(f"k_scale_{i}", (H, capacity // G, D), torch.float16),
                 StateTensor(f"k_zero_{i}", (H, capacity // G, D), torch.float16),
                 StateTensor(f"v_codes_{i}", (H, capacity, D * bits // 8), torch.uint8),
                 StateTensor(f"v_scale_{i}", (H, capacity, D // G), torch.float16),
                 StateTensor(f"v_zero_{i}", (H, capacity, D // G), torch.float16),
                 StateTensor(f"k_ring_{i}", (H, ring, D), ring_dtype)]
        if self.residual:  # R = 0: values are read from their codes as soon as they arrive
            state.append(StateTensor(f"v_ring_{i}", (H, ring, D), ring_dtype))
        params = (bits, G, self.residual)

        def attention(gm, q, k_new, v_new, position, scale, cache):
            cache = cache if self.residual else [*cache, None]
            return gm.graph.call_function(torch.ops.rarefy.kivi_attention.default,
                                          (q, k_new, v_new, *cache, position, scale, *params)), None

        def write(gm, k_new, v_new, position, cache, votes):
            cache = cache if self.residual else [*cache, None]
            return gm.graph.call_function(torch.ops.rarefy.kivi_write.default,
                                          (*cache, k_new, v_new, position, *params))

        rewrite_layer(graph, entry, state, attention, write)
        entry.update(method=f"kivi{bits}", capacity=capacity, bits=bits, group_size=G, residual=self.residual)

    def _evict_layer(self, graph, entry, decoder) -> None:
        i, H, D, C = entry["layer"], entry["num_kv_heads"], entry["head_dim"], self.token_budget
        fp = getattr(torch, decoder["dtype"])
        if self.bits is None:
            slots = [StateTensor(f"k_evict_{i}", (H, C, D), fp), StateTensor(f"v_evict_{i}", (H, C, D), fp)]
            attention_op, write_op, quant = (torch.ops.rarefy.evict_attention.default,
                                             torch.ops.rarefy.evict_write.default, ())
        else:  # per-token codes: a kept slot keeps its own groups (KIVI's per-channel key groups would not)
            G, bits = self.group_size, self.bits
            slots = [StateTensor(f"{kv}_{part}_{i}", (H, C, D * bits // 8) if part == "codes" else (H, C, D // G),
                                 torch.uint8 if part == "codes" else torch.float16)
                     for kv in "kv" for part in ("codes", "scale", "zero")]
            attention_op, write_op, quant = (torch.ops.rarefy.evict_quant_attention.default,
                                             torch.ops.rarefy.evict_quant_write.default, (bits, G))
        state = slots + [StateTensor(f"slot_pos_{i}", (H, C), torch.int64, fill=-1),
                         StateTensor(f"score_{i}", (H, C), torch.float32)]
        observation = self.window if self.method == "snapkv" else 0
        n = len(slots)

        def attention(gm, q, k_new, v_new, position, scale, cache):
            node = gm.graph.call_function(attention_op, (q, k_new, v_new, *cache[:n + 1], position, scale,
                                                         observation, *quant))
            return node, 1  # output 0 is the attention, output 1 the votes

        def write(gm, k_new, v_new, position, cache, votes):
            return gm.graph.call_function(write_op, (*cache, k_new, v_new, votes, position, self.method, self.sinks,
                                                     self.window, self.pool, *quant))

        rewrite_layer(graph, entry, state, attention, write)
        entry.update(method=self.method if self.bits is None else f"{self.method}+int{self.bits}", capacity=C,
                     token_budget=C, sinks=self.sinks, window=self.window)
