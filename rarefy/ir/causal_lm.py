"""``rf.capture_causal_lm``: a Hugging Face causal LM as the decoder-with-past graph that
ONNX Runtime GenAI and Optimum run.

The captured graph is the standard contract

    (input_ids [B, S], attention_mask [B, P+S], position_ids [B, S],
     past_key_values.{i}.key / .value [B, H_kv, P, D]  for every layer i)
      -> (logits [B, S, V], present.{i}.key / .value [B, H_kv, P+S, D])

with every size dynamic, P = 0 included (the first call). Query s of row b sees key j when
``attention_mask[b, j] == 1`` and ``j <= P + s``, so left-padded batches work: padded keys
are never read, and each row's real tokens behave as that prompt run alone.

How: the model runs with ``use_cache=False`` and a registered attention implementation
(``transformers.AttentionInterface``) that receives each layer's post-RoPE q/k/v, appends
k/v to that layer's past (the present) and attends with the mask above (grouped-query heads
by broadcasting, :func:`grouped_attention`). Everything is plain aten, so every pass that runs on a
``rf.capture`` graph runs on this one: its sites have the same names, and calibration and
verification feed it ordinary ``{input_ids, attention_mask}`` batches, completed with
position ids from the mask and an empty past (:meth:`CausalLM.batch_leaves`). The graph
at P = 0 *is* the full-sequence forward; the same graph, exported, is the artifact.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.export import Dim
from torch.utils import _pytree as pytree

from .capture import _config_dict
from .decoder import attention_mode, decoder_geometry, flat_module
from .errors import CaptureError, InputMismatchError
from .graph import Graph
from .signature import Signature, split_inputs

ATTN_IMPLEMENTATION = "rarefy_with_past"
_ACTIVE: list["_PastState"] = []  # the call being traced (attention reads its past from here)


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


class _PastState:
    def __init__(self, attention_mask: torch.Tensor, past: list[torch.Tensor]):
        self.attention_mask = attention_mask
        self.past = list(past)
        self.present = list(past)
        self.cached_mask: torch.Tensor | None = None

    def mask(self, queries, keys, dtype) -> torch.Tensor:
        """The key mask, built by the first layer and read by every other (every layer of one call
        has the same queries and the same past length)."""
        if self.cached_mask is None:
            self.cached_mask = key_mask(self.attention_mask, queries, keys, dtype)
        return self.cached_mask


def key_mask(attention_mask: torch.Tensor, queries: int, keys: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, S, P+S]: 0 where query s may read key j, the dtype's minimum
    elsewhere (finite, so a padded query row that sees no key gives no NaN)."""
    past = keys - queries
    key_pos = torch.arange(keys, device=attention_mask.device)
    query_pos = past + torch.arange(queries, device=attention_mask.device)
    causal = key_pos[None, :] <= query_pos[:, None]  # [S, P+S]
    # the mask's columns read by index, not by broadcasting: its length is then not tied to the
    # cache's at export (a shape relation there would become a guard that ONNX export fails on)
    real = attention_mask.index_select(1, key_pos) != 0  # [B, P+S]
    allowed = causal[None, None] & real[:, None, None, :]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _past_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over past + present k/v for layer ``module.layer_idx`` (HF's layout:
    q/k/v [B, H(kv), S, D] in, [B, S, H, D] out)."""
    if not _ACTIVE:
        raise CaptureError(f"the '{ATTN_IMPLEMENTATION}' attention only runs inside rf.capture_causal_lm")
    call = _ACTIVE[-1]
    i = module.layer_idx
    keys = torch.cat([call.past[2 * i], key], dim=2)
    values = torch.cat([call.past[2 * i + 1], value], dim=2)
    call.present[2 * i], call.present[2 * i + 1] = keys, values
    mask = call.mask(query.shape[2], keys.shape[2], query.dtype)
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    return grouped_attention(query, keys, values, mask, scale).transpose(1, 2).contiguous(), None


def grouped_attention(query, keys, values, mask, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with grouped-query heads, [B, H, S, D] out.

    Query head ``h`` reads kv head ``h // groups`` (HF's ``repeat_kv`` order). The queries are
    viewed as [B, H_kv, groups, S, D] and every group multiplies the same [B, H_kv, 1, L, D]
    keys by broadcasting, instead of copying the cache ``groups`` times: in a decode step the
    copy (``Expand``) and its transpose cost ONNX Runtime more than the attention itself.
    """
    b, heads, length, dim = query.shape
    kv_heads = keys.shape[1]
    q = query.reshape(b, kv_heads, heads // kv_heads, length, dim)
    scores = torch.matmul(q, keys.unsqueeze(2).transpose(-1, -2)) * scale + mask.unsqueeze(2)
    out = torch.matmul(torch.softmax(scores, dim=-1), values.unsqueeze(2))
    return out.reshape(b, heads, length, dim)


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _past_attention)


class _WithPast(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past: list):
        call = _PastState(attention_mask, past)
        _ACTIVE.append(call)
        try:
            out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        finally:
            _ACTIVE.pop()
        logits = out.logits if hasattr(out, "logits") else out[0]
        return (logits, *call.present)


def positions_from_mask(attention_mask: torch.Tensor, past: int = 0) -> torch.Tensor:
    """Position ids [B, S] of the last S = total - past tokens: the count of real tokens before
    each one (ONNX Runtime GenAI's rule), 0 on padding."""
    positions = (attention_mask.to(torch.int64).cumsum(-1) - 1).clamp(min=0)
    positions = positions.masked_fill(attention_mask == 0, 0)
    return positions[:, past:].contiguous()


def capture_causal_lm(model: torch.nn.Module) -> "CausalLM":
    """Capture ``model`` (a Hugging Face causal LM) as a decoder-with-past graph."""
    if not isinstance(model, torch.nn.Module) or getattr(model, "config", None) is None:
        raise CaptureError(f"rf.capture_causal_lm expects a Hugging Face causal LM, got {type(model).__name__}")
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or not hasattr(model, "get_output_embeddings") \
            or model.get_output_embeddings() is None:
        raise CaptureError(f"rf.capture_causal_lm: {type(model).__name__} ({getattr(config, 'model_type', '?')}) "
                           f"is not a decoder-only causal LM (no LM head / an encoder-decoder)")
    geo = decoder_geometry(config)
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) \
            and getattr(config, "model_type", "") not in ("qwen2",):
        raise CaptureError(f"rf.capture_causal_lm: {type(model).__name__} uses sliding-window attention "
                           f"({config.sliding_window} tokens); that is not supported yet")
    _register_attention()
    dtype = next(model.parameters()).dtype
    batch, tokens, past = 2, 3, 4  # sizes > 1, so torch.export keeps them dynamic
    ids = torch.randint(0, geo["vocab_size"], (batch, tokens))
    mask = torch.ones(batch, past + tokens, dtype=torch.int64)
    positions = positions_from_mask(mask, past)
    cache_shape = (batch, geo["num_kv_heads"], past, geo["head_dim"])
    state = [torch.zeros(cache_shape, dtype=dtype) for _ in range(2 * geo["num_layers"])]
    b, s, t, p = Dim("batch"), Dim("sequence"), Dim("total"), Dim("past")
    dynamic = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: t}, "position_ids": {0: b, 1: s},
               "past": [{0: b, 2: p}] * len(state)}
    with attention_mode(model, ATTN_IMPLEMENTATION):
        try:
            ep = torch.export.export(_WithPast(model), (ids, mask, positions, state), dynamic_shapes=dynamic,
                                     strict=False)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CaptureError(f"rf.capture_causal_lm could not export {type(model).__name__}: "
                               f"{type(exc).__name__}: {reason}") from exc
    names = ["input_ids", "attention_mask", "position_ids"] + past_names(geo["num_layers"])
    gm = flat_module(ep.module(), [n.replace(".", "_") for n in names])
    _unwrap_module_paths(gm)
    leaves = [ids, mask, positions, *state]
    _, in_spec = pytree.tree_flatten((tuple(leaves), {}))
    shapes = [(None, None)] * 3 + [(None, cache_shape[1], None, cache_shape[3])] * len(state)
    signature = Signature(names, [t.dtype for t in leaves], shapes, in_spec, None)
    generation = getattr(model, "generation_config", None)
    meta = {"source": type(model).__name__, "config": _config_dict(model),
            "generation_config": generation.to_dict() if generation is not None else {},
            "causal_lm": {**geo, "dtype": str(dtype).replace("torch.", ""),
                          "outputs": ["logits"] + present_names(geo["num_layers"])},
            "example_inputs": (tuple(leaves), {}),
            "dynamic_shapes": {"input_ids": [0, 1], "attention_mask": [0, 1], "position_ids": [0, 1],
                               **{n.replace(".", "_"): [0, 2] for n in names[3:]}}}
    return CausalLM("fx", gm, signature, meta)


def _unwrap_module_paths(gm: torch.fx.GraphModule) -> None:
    """Module paths as in the user's model: ``lm_head``, ``model.layers.0.mlp`` (``targets`` /
    ``ignore`` patterns and reports read them), not under the capture wrapper's ``model.``."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        # "" is the wrapper itself, "model" the user's model (the root), "model.x" its submodule x
        node.meta["nn_module_stack"] = {key: (path[len("model."):], cls) if path != "model" else ("", cls)
                                        for key, (path, cls) in stack.items() if path}


class CausalLM(Graph):
    """A decoder-with-past ``Graph``. Batches may give just ``input_ids`` (and
    ``attention_mask``): position ids and an empty past are filled in, so calibration and
    verification run the full-sequence forward."""

    def copy(self) -> "CausalLM":
        out = super().copy()
        out.__class__ = CausalLM
        return out

    def __call__(self, *args, **kwargs):
        return tuple(self.run_flat(self.batch_leaves((args, kwargs))))

    def refresh_signature(self) -> None:
        """Cache shapes (signature, example inputs, head counts) from the past placeholders'
        metadata, after a pass resized them (PruneHeads removes whole KV groups)."""
        placeholders = [n for n in self.fx.graph.nodes if n.op == "placeholder"]
        shapes = list(self.signature.shapes)
        leaves = list(self.meta["example_inputs"][0])
        for i, node in enumerate(placeholders[3:], start=3):
            heads = int(node.meta["val"].shape[1])
            shapes[i] = (None, heads, None, shapes[i][3])
            leaves[i] = leaves[i].new_zeros((leaves[i].shape[0], heads, *leaves[i].shape[2:]))
        self.signature.shapes = shapes
        self.meta["example_inputs"] = (tuple(leaves), {})
        kv_heads = sorted({s[1] for s in shapes[3:]})
        decoder = self.meta["causal_lm"]
        if len(kv_heads) == 1 and kv_heads[0] != decoder["num_kv_heads"]:
            groups = decoder["num_heads"] // decoder["num_kv_heads"]
            self.meta["causal_lm"] = {**decoder, "num_kv_heads": kv_heads[0], "num_heads": kv_heads[0] * groups}
        elif len(kv_heads) > 1:
            self.meta["causal_lm"] = {**decoder, "kv_heads_per_layer": [s[1] for s in shapes[3::2]]}

    def run_batch(self, batch: Any) -> list[torch.Tensor]:
        """The logits of one batch: what verification compares. The presents are left out: an
        exact rewrite may change the cached values while keeping every logit (SmoothQuant folds
        its scales into the value projection)."""
        return self.run_flat(self.batch_leaves(batch))[:1]

    def batch_leaves(self, batch: Any) -> list[torch.Tensor]:
        args, kwargs = batch if _is_call(batch) else split_inputs(batch)
        named = dict(zip(self.signature.names, args))
        named.update(kwargs)
        if "input_ids" not in named:
            raise InputMismatchError(f"a causal LM batch needs input_ids, got {sorted(named)}")
        ids = named["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise InputMismatchError(f"input_ids must be a [B, S] tensor, got {getattr(ids, 'shape', type(ids))}")
        unknown = set(named) - set(self.signature.names)
        if unknown:
            raise InputMismatchError(f"unknown inputs {sorted(unknown)}; the graph takes {self.signature.describe()}")
        named.setdefault("attention_mask", torch.ones_like(ids, dtype=torch.int64))
        past = named["attention_mask"].shape[1] - ids.shape[1]
        named.setdefault("position_ids", positions_from_mask(named["attention_mask"], past))
        for spec_name, dtype, shape in zip(self.signature.names[3:], self.signature.dtypes[3:],
                                           self.signature.shapes[3:]):
            named.setdefault(spec_name, torch.zeros((ids.shape[0], shape[1], past, shape[3]), dtype=dtype))
        return self.signature.flatten(tuple(named[n] for n in self.signature.names), {})


def _is_call(batch) -> bool:
    return isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], tuple) and isinstance(batch[1], dict)


def without_unread_caches(graph: CausalLM) -> CausalLM:
    """``graph``, or a copy without the past inputs and present outputs of layers whose attention
    no longer reads its cache (``DropLayers`` bypassed it): a present whose only reader is the
    graph output. The remaining caches are numbered 0, 1, ... in layer order, as GenAI expects;
    ``meta["causal_lm"]["cache_layers"]`` keeps the model layer of each."""
    gm = graph.fx
    out_node = gm.graph.output_node()
    outputs = list(out_node.args[0])
    layers = graph.meta["causal_lm"]["num_layers"]
    unread = [i for i in range(layers) if all(set(p.users) == {out_node} for p in outputs[1 + 2 * i: 3 + 2 * i])]
    if not unread:
        return graph
    out = graph.copy()
    gm = out.fx
    out_node = gm.graph.output_node()
    outputs = list(out_node.args[0])
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    kept = [i for i in range(layers) if i not in unread]
    out_node.args = ((outputs[0], *[outputs[1 + 2 * i + j] for i in kept for j in (0, 1)]),)
    gm.graph.eliminate_dead_code()
    keep_inputs = list(range(3)) + [3 + 2 * i + j for i in kept for j in (0, 1)]
    for index, node in enumerate(placeholders):
        if index not in keep_inputs:
            if node.users:
                raise CaptureError(f"the cache input {node.name} is still read after its layer's attention was removed")
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    sig = out.signature
    leaves = [out.meta["example_inputs"][0][i] for i in keep_inputs]
    _, in_spec = pytree.tree_flatten((tuple(leaves), {}))
    out.signature = Signature(["input_ids", "attention_mask", "position_ids"] + past_names(len(kept)),
                              [sig.dtypes[i] for i in keep_inputs], [sig.shapes[i] for i in keep_inputs], in_spec, None)
    out.meta["example_inputs"] = (tuple(leaves), {})
    kept_names = {placeholders[i].name for i in keep_inputs}
    out.meta["dynamic_shapes"] = {k: v for k, v in out.meta["dynamic_shapes"].items() if k in kept_names}
    decoder = out.meta["causal_lm"]
    model_layers = decoder.get("cache_layers") or list(range(layers))
    out.meta["causal_lm"] = {**decoder, "num_layers": len(kept), "cache_layers": [model_layers[i] for i in kept],
                             "outputs": ["logits"] + present_names(len(kept))}
    return out

