"""``rf.capture_decoder``: one decode step of a Hugging Face causal LM, with its KV cache explicit.

The captured step is a pure function

    step(input_ids [B, T], cache_position [T], *state) -> (logits [B, T, V], *new_state)

where ``state`` is the KV cache of every layer as graph inputs and outputs (dense at capture:
``k_cache_i``, ``v_cache_i`` of shape [B, H_kv, C, Dh], C = ``max_cache_len``). Positions are
the same for every batch row (no left padding). Tokens at ``cache_position`` attend to the
cache (positions before ``cache_position[0]``) and causally to each other, so prefill and
decoding run through the same step.

How: the model runs with ``use_cache=False`` and a registered attention implementation
(``transformers.AttentionInterface``) that receives each layer's post-RoPE q/k/v and calls
two rarefy ops, ``rarefy::cache_attention`` and ``rarefy::cache_write`` (math in
``rarefy/kernels/kv_cache.py``), on that layer's cache tensors. ``torch.export`` keeps the
ops opaque, so ``CompressKV`` rewrites a cache by swapping them and their state tensors.
``graph.meta["decoder"]`` describes the state (names, shapes, dtypes, initial fill) and
``graph.meta["kv_cache"]`` one entry per layer (the ``kv_cache`` sites).

A step graph is a :class:`DecoderStep`: verification inside ``rf.optimize`` feeds it prompts
(``input_ids`` tensors, dicts or the step's own example tuple, whose first element is taken),
runs them token by token through the step (teacher forcing, so every token reads the
compressed cache) and compares the logits.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.export import Dim
from torch.utils import _pytree as pytree

from .capture import _config_dict
from .errors import CaptureError, InputMismatchError
from .graph import Graph
from .signature import Signature


ATTN_IMPLEMENTATION = "rarefy_kv_step"
_ACTIVE: list["_StepState"] = []  # the step being traced (attention reads its cache from here)


class _StepState:
    def __init__(self, cache_position: torch.Tensor, state: list[torch.Tensor]):
        self.cache_position = cache_position
        self.state = list(state)
        self.new_state = list(state)


def _step_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention implementation used while capturing: cache ops on this layer's state."""
    if not _ACTIVE:
        raise CaptureError(f"the '{ATTN_IMPLEMENTATION}' attention only runs inside rf.capture_decoder")
    step = _ACTIVE[-1]
    i = module.layer_idx
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    k_cache, v_cache = step.state[2 * i], step.state[2 * i + 1]
    out = torch.ops.rarefy.cache_attention(query, key, value, k_cache, v_cache, step.cache_position, scale)
    step.new_state[2 * i], step.new_state[2 * i + 1] = torch.ops.rarefy.cache_write(
        k_cache, v_cache, key, value, step.cache_position)
    return out, None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _step_attention)


class _Step(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, cache_position, state: list):
        step = _StepState(cache_position, state)
        _ACTIVE.append(step)
        try:
            positions = cache_position[None, :].expand(input_ids.shape[0], -1)
            out = self.model(input_ids=input_ids, position_ids=positions, use_cache=False)
        finally:
            _ACTIVE.pop()
        logits = out.logits if hasattr(out, "logits") else out[0]
        return (logits, *step.new_state)


@contextlib.contextmanager
def attention_mode(model, implementation: str):
    """Eval mode, HF caches off and attention through ``implementation`` (registered with
    ``transformers.AttentionInterface``) while capturing; everything restored after."""
    config = model.config
    was_training, old_impl, old_use_cache = model.training, config._attn_implementation, config.use_cache
    model.eval()
    config._attn_implementation = implementation
    config.use_cache = False
    try:
        yield
    finally:
        model.train(was_training)
        config._attn_implementation = old_impl
        config.use_cache = old_use_cache


def decoder_geometry(config) -> dict:
    """Layers, kv heads and head dim of a Hugging Face decoder config."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if not layers or not heads:
        raise CaptureError(f"rf.capture_decoder: config {type(config).__name__} names no num_hidden_layers / "
                           f"num_attention_heads; is this a decoder-only language model?")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"num_layers": layers, "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim,
            "vocab_size": config.vocab_size, "max_positions": getattr(config, "max_position_embeddings", None)}


def capture_decoder(model: torch.nn.Module, max_cache_len: int = 1024) -> "DecoderStep":
    """Capture one decode step of ``model`` (a HF causal LM) with a static cache of ``max_cache_len``."""
    if not isinstance(model, torch.nn.Module) or getattr(model, "config", None) is None:
        raise CaptureError(f"rf.capture_decoder expects a Hugging Face causal LM, got {type(model).__name__}")
    if not isinstance(max_cache_len, int) or max_cache_len < 2:
        raise CaptureError(f"rf.capture_decoder: max_cache_len must be an int >= 2, got {max_cache_len!r}")
    config = model.config
    geo = decoder_geometry(config)
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) \
            and config.sliding_window < max_cache_len:
        raise CaptureError(f"rf.capture_decoder: {type(model).__name__} uses sliding-window attention "
                           f"({config.sliding_window} tokens); that is not supported yet")
    _register_attention()
    dtype = next(model.parameters()).dtype
    batch, tokens = 2, 3  # sizes > 1, so torch.export keeps them dynamic
    cache_shape = (batch, geo["num_kv_heads"], max_cache_len, geo["head_dim"])
    state = [torch.zeros(cache_shape, dtype=dtype) for _ in range(2 * geo["num_layers"])]
    ids = torch.randint(0, geo["vocab_size"], (batch, tokens))
    cache_position = torch.arange(tokens)
    b, t = Dim("batch"), Dim("tokens", max=max_cache_len)
    dynamic = {"input_ids": {0: b, 1: t}, "cache_position": {0: t}, "state": [{0: b}] * len(state)}
    with attention_mode(model, ATTN_IMPLEMENTATION):
        try:
            ep = torch.export.export(_Step(model), (ids, cache_position, state), dynamic_shapes=dynamic,
                                     strict=False)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CaptureError(f"rf.capture_decoder could not export {type(model).__name__}: "
                               f"{type(exc).__name__}: {reason}") from exc
    names = ["input_ids", "cache_position"] + [f"{kv}_cache_{i}" for i in range(geo["num_layers"]) for kv in "kv"]
    gm = flat_module(ep.module(), names)
    leaves = [ids, cache_position]
    entries = [{"name": f"layer{i}", "layer": i, "method": "dense",
                "tensors": {"key": f"k_cache_{i}", "value": f"v_cache_{i}"},
                "shapes": {"key": list(cache_shape[1:]), "value": list(cache_shape[1:])},
                "num_kv_heads": geo["num_kv_heads"], "head_dim": geo["head_dim"], "capacity": max_cache_len}
               for i in range(geo["num_layers"])]
    _name_layers(gm, entries)
    meta = {"source": type(model).__name__, "config": _config_dict(model),
            "decoder": {**geo, "capacity": max_cache_len, "max_tokens": max_cache_len, "dtype": str(dtype).replace("torch.", "")},
            "kv_cache": entries}
    state_spec = [{"name": n, "shape": [None, *cache_shape[1:]], "dtype": str(dtype).replace("torch.", ""), "fill": 0}
                  for n in names[2:]]
    return DecoderStep.build(gm, leaves, names, state_spec, meta)


def flat_module(gm: torch.fx.GraphModule, names: list[str]) -> torch.fx.GraphModule:
    """Positional inputs named ``names`` and a flat tuple of outputs (no pytree codegen)."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(names):
        raise CaptureError(f"captured step has {len(placeholders)} inputs, expected {len(names)}")
    for node in list(graph.nodes):  # torch.export's input guards assume the pytree calling convention
        if node.op == "call_module" and node.target.startswith("_guards"):
            graph.erase_node(node)
    for node, name in zip(placeholders, names):
        node.name = node.target = name
    gm._forward_pre_hooks.clear()  # ... and so does its input check
    graph.set_codegen(torch.fx.graph.CodeGen())
    out = graph.output_node()
    out.args = (tuple(pytree.tree_leaves(out.args[0])),)
    graph.lint()
    gm.recompile()
    return gm


def _name_layers(gm: torch.fx.GraphModule, entries: list[dict]) -> None:
    """Name each kv_cache entry after the attention module that reads it (nn_module_stack)."""
    for node in gm.graph.nodes:
        if node.target is torch.ops.rarefy.cache_attention.default:
            layer = int(node.args[3].name.rsplit("_", 1)[1])
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                entries[layer]["name"] = list(stack.values())[-1][0]


class DecoderStep(Graph):
    """A ``Graph`` of one decode step; ``run_batch`` runs prompts token by token."""

    @classmethod
    def build(cls, gm, leaves: list, names: list[str], state: list[dict], meta: dict) -> "DecoderStep":
        meta = dict(meta)
        meta["decoder"] = {**meta["decoder"], "state": state}
        step = cls("fx", gm, None, meta)
        step.refresh_signature(example=leaves[:2])
        return step

    def refresh_signature(self, example: list | None = None) -> None:
        """Rebuild signature, example inputs and dynamic axes from ``meta["decoder"]["state"]``
        (after a pass changed the state tensors); ``example`` gives input_ids and positions."""
        state = self.meta["decoder"]["state"]
        ids, positions = example if example is not None else self.meta["example_inputs"][0][:2]
        leaves = [ids, positions, *initial_state(self, ids.shape[0])]
        names = ["input_ids", "cache_position"] + [s["name"] for s in state]
        shapes = [(None, None), (None,)] + [tuple(s["shape"]) for s in state]
        _, in_spec = pytree.tree_flatten((tuple(leaves), {}))
        self.signature = Signature(names, [t.dtype for t in leaves], shapes, in_spec, None)
        self.meta["example_inputs"] = (tuple(leaves), {})
        self.meta["dynamic_shapes"] = {"input_ids": [0, 1], "cache_position": [0], **{n: [0] for n in names[2:]}}

    def copy(self) -> "DecoderStep":
        out = super().copy()
        out.__class__ = DecoderStep
        return out

    def run_batch(self, batch: Any) -> list[torch.Tensor]:
        """Teacher-forced logits [B, T, V] of a prompt, one token per step through the cache."""
        return [teacher_forced_logits(self, prompt_ids(batch))]

    def cache_bytes(self, batch_size: int = 1) -> int:
        """Bytes of the whole KV state (every layer) for ``batch_size`` sequences."""
        total = 0
        for spec in self.meta["decoder"]["state"]:
            numel = batch_size
            for d in spec["shape"][1:]:
                numel *= d
            total += numel * torch.empty((), dtype=getattr(torch, spec["dtype"])).element_size()
        return total


def prompt_ids(batch: Any) -> torch.Tensor:
    """The token ids of a batch given as a tensor, a dict with ``input_ids``, or a tuple."""
    if isinstance(batch, torch.Tensor):
        ids = batch
    elif isinstance(batch, dict) or hasattr(batch, "keys"):
        ids = batch["input_ids"]
    elif isinstance(batch, (tuple, list)) and batch:
        ids = batch[0]
    else:
        raise InputMismatchError(f"a decoder batch is input_ids [B, T] (tensor, dict or tuple), got {type(batch)}")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise InputMismatchError(f"input_ids must be a [B, T] tensor, got {getattr(ids, 'shape', type(ids))}")
    return ids


def initial_state(graph: Graph, batch_size: int) -> list[torch.Tensor]:
    """The empty cache: zeros (or each state tensor's fill value) for ``batch_size`` sequences."""
    return [torch.full((batch_size, *spec["shape"][1:]), spec["fill"], dtype=getattr(torch, spec["dtype"]))
            for spec in graph.meta["decoder"]["state"]]


def teacher_forced_logits(step, input_ids: torch.Tensor, graph: Graph | None = None, prefill: int = 0,
                          chunk: int = 1):
    """Logits [B, T, V] of ``input_ids`` through ``step`` (a graph or a compiled step): the first
    ``prefill`` tokens in one call, then ``chunk`` tokens per call, so later tokens read the cache."""
    graph = graph if graph is not None else step
    state = initial_state(graph, input_ids.shape[0])
    length = input_ids.shape[1]
    first = min(max(prefill, chunk), length)
    bounds = [(0, first)] + [(i, min(i + chunk, length)) for i in range(first, length, chunk)]
    logits = []
    for start, stop in bounds:
        out = step(input_ids[:, start:stop].contiguous(), torch.arange(start, stop), *state)
        logits.append(out[0])
        state = list(out[1:])
    return torch.cat(logits, dim=1)
