"""Sites: the places in a graph that compression passes target.

``graph.sites(kind)`` answers, on both dialects:

* ``linear`` — a matrix multiply by a weight the graph owns (``aten.linear`` in FX;
  ``MatMul``/``Gemm`` with an initializer in ONNX), named by its module's qualified name.
* ``block`` — one per transformer layer: the repeated children of the model's main
  ``ModuleList`` (found as the ``prefix.<i>`` module paths holding the most linears), with
  the names of its attention part and its MLP part and, in FX, the block's nodes, its
  hidden-state input and its output.
* ``attention`` — the attention part of each block: its q/k/v/o (or fused qkv) linears and
  head counts from the model config.
* ``kv_cache`` — the cache tensors of a graph from ``rf.capture_decoder``.

Names come from the exported ``nn_module_stack`` (FX) or from ONNX name scopes
(``pkg.torch.onnx.name_scopes`` metadata, falling back to initializer names).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import UnsupportedError

_BLOCK_PATH = re.compile(r"^(.*)\.(\d+)$")
# node.meta key (and linear Site.info key) of a linear a pass keeps in full precision on purpose
# (SplitOutliers' side branch); the quantization passes leave such linears alone
KEEP_PRECISION = "rarefy_keep_precision"
_ATTENTION_CLASS = re.compile(r"attention|attn", re.I)
_ROLE_PATTERNS = {
    "q": re.compile(r"(^|\.)(q_proj|query|q_lin|q)$"),
    "k": re.compile(r"(^|\.)(k_proj|key|k_lin|k)$"),
    "v": re.compile(r"(^|\.)(v_proj|value|v_lin|v)$"),
    "qkv": re.compile(r"(^|\.)(qkv_proj|query_key_value|c_attn|qkv|Wqkv)$"),
    "o": re.compile(r"(^|\.)(o_proj|out_proj|out_lin|c_proj|dense|output\.dense|o)$"),
}


@dataclass
class Site:
    """One target of a pass. ``nodes`` are FX nodes or onnx-ir nodes of the graph it came from."""

    kind: str
    name: str
    nodes: list = field(default_factory=list)
    tensors: dict[str, str] = field(default_factory=dict)  # role -> attribute path / ONNX value name
    shapes: dict[str, tuple] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    index: int | None = None

    def __repr__(self) -> str:
        return f"Site({self.kind}, {self.name!r}, shapes={self.shapes})"


_FINDERS: dict[tuple[str, str], Callable] = {}


def site_finder(kind: str, dialect: str):
    """Register the function that finds sites of ``kind`` in graphs of ``dialect``."""
    def register(fn):
        _FINDERS[(kind, dialect)] = fn
        return fn

    return register


def site_kinds() -> list[str]:
    return sorted({kind for kind, _ in _FINDERS})


def find_sites(graph, kind: str) -> list[Site]:
    finder = _FINDERS.get((kind, graph.dialect))
    if finder is None:
        known = site_kinds()
        if kind not in known:
            raise UnsupportedError(f"unknown site kind {kind!r}; known kinds: {known}")
        raise UnsupportedError(f"sites of kind {kind!r} are not available on {graph.dialect}-dialect graphs")
    return finder(graph)


# -- FX dialect ----------------------------------------------------------------------------
def module_path(node: torch.fx.Node) -> str:
    """Qualified name of the innermost module a node came from ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def module_paths(node: torch.fx.Node) -> list[tuple[str, str]]:
    """(qualified name, class name) of every module on the node's stack, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        out.append((path, cls_name.rsplit(".", 1)[-1]))
    return out


def _attr_shape(gm, target: str) -> tuple:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return tuple(obj.shape)


@site_finder("linear", "fx")
def _fx_linear_sites(graph) -> list[Site]:
    gm = graph.fx
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        weight = node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
            continue  # a product of two activations, not a weight the graph owns
        tensors = {"weight": weight.target}
        if isinstance(bias, torch.fx.Node) and bias.op == "get_attr":
            tensors["bias"] = bias.target
        shape = _attr_shape(gm, weight.target)
        name = module_path(node) or weight.target.rsplit(".", 1)[0]
        info = {"in_features": shape[1], "out_features": shape[0]}
        if node.meta.get(KEEP_PRECISION):
            info[KEEP_PRECISION] = True
        sites.append(Site("linear", name, [node], tensors, {"weight": shape}, info))
    return sites


def _block_prefix(paths_per_linear: list[list[tuple[str, str]]]) -> str | None:
    """The ModuleList prefix whose numbered children hold the most linears."""
    counts: dict[str, int] = defaultdict(int)
    for paths in paths_per_linear:
        seen = set()
        for path, _ in paths:
            match = _BLOCK_PATH.match(path)
            if match and match.group(1) not in seen:
                seen.add(match.group(1))
                counts[match.group(1)] += 1
    if not counts:
        return None
    return max(counts, key=lambda p: (counts[p], -len(p)))


@site_finder("block", "fx")
def _fx_block_sites(graph) -> list[Site]:
    gm = graph.fx
    linears = _fx_linear_sites(graph)
    prefix = _block_prefix([module_paths(s.nodes[0]) for s in linears])
    if prefix is None:
        return []
    members: dict[int, list[torch.fx.Node]] = defaultdict(list)
    classes: dict[int, dict[str, str]] = defaultdict(dict)
    for node in gm.graph.nodes:
        for path, cls in module_paths(node):
            match = _BLOCK_PATH.match(path)
            if match and match.group(1) == prefix:
                members[int(match.group(2))].append(node)
            if path.startswith(prefix + "."):
                rest = path[len(prefix) + 1:]
                index = rest.split(".", 1)[0]
                if index.isdigit():
                    classes[int(index)][path] = cls
    sites = []
    for index in sorted(members):
        nodes = members[index]
        name = f"{prefix}.{index}"
        node_set = set(nodes)
        inputs = []
        for node in nodes:
            for arg in node.all_input_nodes:
                if arg not in node_set and arg.op != "get_attr" and arg not in inputs:
                    inputs.append(arg)
        outputs = [n for n in nodes if any(u not in node_set for u in n.users)]
        block_linears = [s.name for s in linears if s.name.startswith(name + ".")]
        attention = _attention_part(name, classes[index])
        parts = {
            "attention": attention,
            "attention_linears": [n for n in block_linears if attention and n.startswith(attention + ".")],
            "mlp_linears": [n for n in block_linears if not (attention and n.startswith(attention + "."))],
        }
        # the residual stream leaves for the next block; a decoder's present k/v go straight to the graph output
        stream = [n for n in outputs if any(u not in node_set and u.op != "output" for u in n.users)]
        hidden_in = _hidden_input(inputs, stream or outputs)
        sites.append(Site("block", name, nodes, {}, {}, {
            **parts, "linears": block_linears, "class": classes[index].get(name, ""),
            "inputs": inputs, "outputs": outputs, "hidden_input": hidden_in,
        }, index=index))
    return sites


def _attention_part(block: str, classes: dict[str, str]) -> str | None:
    candidates = [p for p, cls in classes.items() if p != block and _ATTENTION_CLASS.search(cls)]
    return min(candidates, key=len) if candidates else None


def _hidden_input(inputs: list, outputs: list):
    """The block input with the shape of the block output: the residual stream."""
    if not outputs:
        return None
    out_val = outputs[0].meta.get("val")
    for node in inputs:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and isinstance(out_val, torch.Tensor) and val.dim() == out_val.dim() \
                and val.is_floating_point() and val.shape[-1] == out_val.shape[-1]:
            return node
    return None


def attention_from_block(block: Site, config: dict, linear_names: list[str]) -> Site | None:
    """The attention site of a block: role -> linear name, and head counts from the config."""
    part = block.info.get("attention")
    if part is None:
        return None
    roles = {}
    for linear in block.info["attention_linears"] or linear_names:
        local = linear[len(part) + 1:]
        for role, pattern in _ROLE_PATTERNS.items():
            if role not in roles and pattern.search(local):
                roles[role] = linear
                break
    heads = config.get("num_attention_heads") or config.get("n_head") or config.get("n_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    hidden = config.get("hidden_size") or config.get("n_embd") or config.get("dim")
    head_dim = config.get("head_dim") or (hidden // heads if hidden and heads else None)
    return Site("attention", part, block.nodes, roles, {}, {
        "block": block.name, "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim,
    }, index=block.index)


@site_finder("attention", "fx")
def _fx_attention_sites(graph) -> list[Site]:
    config = graph.meta.get("config") or {}
    out = []
    for block in _fx_block_sites(graph):
        site = attention_from_block(block, config, block.info["linears"])
        if site is not None:
            site.nodes = [n for n in block.nodes if module_path(n).startswith(site.name)]
            out.append(site)
    return out


@site_finder("kv_cache", "fx")
def _fx_kv_cache_sites(graph) -> list[Site]:
    """Cache sites are recorded by rf.capture_decoder in graph.meta['kv_cache']."""
    return [Site("kv_cache", entry["name"], [], dict(entry.get("tensors", {})), dict(entry.get("shapes", {})),
                 dict(entry), index=entry.get("layer"))
            for entry in graph.meta.get("kv_cache", [])]


from . import onnx_sites  # noqa: E402,F401  (registers the ONNX-dialect finders)
