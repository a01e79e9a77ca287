"""``SmoothQuant``: migrate activation outliers into the weights, an exact rewrite.

Method (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models", Eq. 4): for linears reading the same input ``X`` (q/k/v
together, gate/up together), per input channel ``j``

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      # max|W_j| over all the group's weights

and ``Y = X W^T = (X diag(s)^-1) (W diag(s))^T``: the weights' columns are multiplied by
``s`` and ``1/s`` is folded into whatever produced ``X``, so no op is added on the path
into the linears:

* a ``LayerNorm`` (weight and bias) or RMSNorm (its weight multiply) — when the norm's
  output also feeds something else (BERT's post-LN residual), that use gets a ``mul`` by
  ``s`` that restores the original value;
* the value projection of the same attention, for the output projection (v -> o):
  ``softmax(QK^T) V`` is linear in V's channels, so V's output rows take ``1/s`` and o's
  columns ``s``; with grouped-query attention the heads sharing a KV head share ``s``.

A linear fed by a nonlinearity (BERT's / Llama's MLP down projection after GELU / SiLU) has
nowhere exact to fold ``1/s`` and is skipped with that reason. ``max|X_j|`` comes from
``linear_input_stats(..., ("abs_max",))`` on the calibration batches, so the pass needs
calibration data. Run it before ``QuantizeActivations`` / ``QuantizeWeights``.

Exactness: the rewrite is algebraically exact, but each scaled weight and folded norm
parameter is rounded to fp32 once more, so outputs move by a few fp32 ulps *of their
magnitude*: measured 2e-7 to 1.2e-6 on tiny models and 4.6e-6 on MiniLM (32 x 128 tokens,
|y| up to ~10). The verifier compares absolute errors, and decoder LLMs carry residual
streams in the hundreds, where one fp32 ulp (7.6e-6 at 100) already approaches 1e-5; so
the class tolerance is ``1e-4`` absolute — an fp32 rounding floor, still 1000x below the
error int8 quantization adds afterwards (MiniLM: 0.23 max abs). Dialect: FX. Dtypes: fp32
(scales are computed in fp64).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ir.calibration import linear_input_stats
from ..ir.errors import UnsupportedError
from ..ir.fx_utils import add_tensor, get_tensor, set_tensor
from . import args
from .base import Pass, PassResult

aten = torch.ops.aten
# ops that pass a tensor through unchanged (on the path between a norm and its linears)
_PASSTHROUGH = {aten.clone.default, aten.alias.default, aten.contiguous.default, aten.dropout.default,
                aten.detach.default}
_MIN_SCALE = 1e-5


@dataclass
class SmoothGroup:
    """Linears sharing an input, and where their ``1/s`` is folded."""

    linears: list  # linear sites
    kind: str  # "layer_norm" | "rms_norm" | "value"
    source: torch.fx.Node | None = None  # the norm node (norm kinds)
    fold: dict = field(default_factory=dict)  # role -> attribute path ("weight", "bias")
    other_uses: list = field(default_factory=list)  # (value, user): the norm output read elsewhere
    heads: tuple = ()  # (num_heads, num_kv_heads, head_dim) for the value kind


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s = max|X|^alpha / max|W|^(1-alpha)`` per input channel (fp64)."""
    w_max = torch.stack([w.detach().abs().amax(0).double() for w in weights]).amax(0)
    act = act_max.double()
    s = act.pow(alpha) / w_max.pow(1 - alpha)
    ok = (act > 0) & (w_max > 0) & torch.isfinite(s)
    return torch.where(ok, s.clamp_min(_MIN_SCALE), torch.ones_like(s))


class SmoothQuant(Pass):
    """Per-channel smoothing scales folded into norms and value projections (exact)."""

    exact = True
    tolerance = 1e-4  # fp32 re-rounding of scaled weights; see the module docstring
    needs_calibration = True
    dialects = ("fx",)
    must_run_before = ("QuantizeActivations", "QuantizeWeights")

    def __init__(self, alpha: float = 0.5, *, targets=None, ignore=None, budget=None):
        super().__init__(targets=targets, ignore=ignore, budget=budget)
        self.alpha = args.number(self.name, "alpha", alpha, low=0.0, high=1.0)  # the paper uses 0.5

    def requires(self, graph, ctx) -> None:
        groups, _ = self.plan(graph)
        if not groups:
            raise UnsupportedError("no linear in this graph reads a LayerNorm/RMSNorm or a value projection; "
                                   "nothing to smooth")

    # -- analysis -------------------------------------------------------------------------------
    def plan(self, graph) -> tuple[list[SmoothGroup], dict[str, str]]:
        """The groups to smooth, and {linear name: why it is not smoothed}."""
        gm = graph.fx
        sites = graph.sites("linear")
        names, skipped = self.select([s.name for s in sites])
        chosen = [s for s in sites if s.name in set(names)]
        by_input: dict[torch.fx.Node, list] = {}
        for site in chosen:
            by_input.setdefault(_through_passthrough(site.nodes[0].args[0]), []).append(site)
        value_groups = {g.linears[0].name: g for g in _value_groups(graph, chosen)}
        groups = []
        for source, linears in by_input.items():
            if len(linears) == 1 and linears[0].name in value_groups:
                groups.append(value_groups[linears[0].name])
                continue
            group, why = _norm_group(gm, source, linears)
            if group is None:
                skipped.update({s.name: why for s in linears})
            else:
                groups.append(group)
        shared = [s.name for g in groups for s in g.linears if _is_shared(gm, s.tensors["weight"])]
        if shared:
            groups = [g for g in groups if not any(s.name in shared for s in g.linears)]
            skipped.update({n: "its weight is shared with another node (tied), scaling it would change both"
                            for n in shared})
        return groups, skipped

    # -- rewrite ----------------------------------------------------------------------------------
    def call(self, graph, ctx) -> PassResult:
        groups, skipped = self.plan(graph)
        sites = [s for g in groups for s in g.linears]
        act = linear_input_stats(graph, ctx.batches, sites, ("abs_max",), progress=ctx.progress)
        gm = graph.fx
        stats = {"smoothed_linear": 0, "folded_layer_norm": 0, "folded_rms_norm": 0, "folded_value": 0,
                 "residual_compensation": 0, "skipped": len(skipped)}
        details = {}
        for group in groups:
            weights = [get_tensor(gm, s.tensors["weight"]) for s in group.linears]
            act_max = torch.stack([act[s.name]["abs_max"] for s in group.linears]).amax(0)
            if group.kind == "value":
                scales = _apply_value(gm, group, act_max, weights, self.alpha)
            else:
                scales = smoothing_scales(act_max, weights, self.alpha)
                _apply_norm(gm, group, scales)
                stats["residual_compensation"] += len(group.other_uses)
            stats[f"folded_{group.kind}"] += 1
            stats["smoothed_linear"] += len(group.linears)
            for s in group.linears:
                details[s.name] = {"folded_into": group.kind, "scale_min": round(float(scales.min()), 4),
                                   "scale_max": round(float(scales.max()), 4)}
        notes = [f"{name}: not smoothed ({why})" for name, why in skipped.items()]
        return PassResult(graph, bool(groups), stats, notes, details)


def _through_passthrough(node):
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _PASSTHROUGH:
        node = node.args[0]
    return node


def _is_shared(gm, target: str) -> bool:
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target]
    if len(readers) != 1 or len(readers[0].users) != 1:
        return True
    tensor = get_tensor(gm, target)
    aliases = [name for name, t in list(gm.named_parameters(remove_duplicate=False))
               + list(gm.named_buffers(remove_duplicate=False)) if t is tensor]
    return len(aliases) > 1


def _norm_group(gm, source, linears) -> tuple[SmoothGroup | None, str]:
    """A group folded into the norm that produces ``source``, or (None, why not)."""
    if not isinstance(source, torch.fx.Node) or source.op != "call_function":
        return None, "its input is a graph input, not a norm"
    fold, kind = {}, None
    if source.target == aten.layer_norm.default:
        weight, bias = (source.args + (None, None, None, None))[2:4]
        if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
            return None, "its LayerNorm has no affine weight to fold into"
        fold["weight"] = weight.target
        if isinstance(bias, torch.fx.Node) and bias.op == "get_attr":
            fold["bias"] = bias.target
        kind = "layer_norm"
    elif source.target == aten.rms_norm.default and isinstance(source.args[2] if len(source.args) > 2 else None,
                                                                 torch.fx.Node):
        fold["weight"], kind = source.args[2].target, "rms_norm"
    elif source.target == aten.mul.Tensor:  # HF RMSNorm: weight * normalized
        attrs = [a for a in source.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
        k = linears[0].info["in_features"]
        if len(attrs) == 1 and tuple(get_tensor(gm, attrs[0].target).shape) == (k,):
            fold["weight"], kind = attrs[0].target, "rms_norm"
    if kind is None:
        return None, f"its input comes from {_describe(source)}, not a norm or a value projection: nowhere exact to fold 1/s"
    if any(_is_shared(gm, t) for t in fold.values()):
        return None, "the norm's parameters are shared with another node"
    other_uses = _other_uses(source, {s.nodes[0] for s in linears})
    return SmoothGroup(list(linears), kind, source, fold, other_uses), ""


def _other_uses(node, linear_nodes) -> list[tuple]:
    """(value, user) pairs where the norm output, possibly through pass-through ops, is read
    by something other than the group's linears (e.g. BERT's residual add)."""
    out = []
    for user in node.users:
        if user in linear_nodes:
            continue
        if user.op == "call_function" and user.target in _PASSTHROUGH:
            out.extend(_other_uses(user, linear_nodes))
        else:
            out.append((node, user))
    return out


def _describe(node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _value_groups(graph, chosen) -> list[SmoothGroup]:
    """o-projection groups folded into the same attention's value projection."""
    by_name = {s.name: s for s in chosen}
    out = []
    for att in graph.sites("attention"):
        v, o = att.tensors.get("v"), att.tensors.get("o")
        if v not in by_name or o not in by_name:
            continue
        heads = (att.info.get("num_heads"), att.info.get("num_kv_heads"), att.info.get("head_dim"))
        if by_name[v].info["out_features"] != by_name[o].info["in_features"] and None in heads:
            continue
        out.append(SmoothGroup([by_name[o]], "value", fold=dict(by_name[v].tensors), heads=heads))
    return out


def _scaled(gm, target: str, factor: torch.Tensor) -> None:
    """Replace the tensor at ``target`` by itself times ``factor`` (fp64 product, same dtype)."""
    t = get_tensor(gm, target)
    set_tensor(gm, target, (t.detach().double() * factor).to(t.dtype))


def _apply_norm(gm, group: SmoothGroup, scales: torch.Tensor) -> None:
    for site in group.linears:  # W diag(s)
        _scaled(gm, site.tensors["weight"], scales)
    for target in group.fold.values():  # norm(x) diag(s)^-1
        _scaled(gm, target, 1 / scales)
    if not group.other_uses:
        return
    # other readers see norm(x) diag(s)^-1 diag(s) = norm(x)
    name = add_tensor(gm, f"{group.fold['weight']}.smooth_scale", scales.to(get_tensor(gm, group.fold["weight"]).dtype))
    restored = {}
    for value, user in group.other_uses:
        if value not in restored:
            with gm.graph.inserting_after(value):
                scale_node = gm.graph.get_attr(name)
            with gm.graph.inserting_after(scale_node):
                restored[value] = gm.graph.call_function(aten.mul.Tensor, (value, scale_node))
            restored[value].meta = dict(value.meta)
        user.replace_input_with(value, restored[value])


def _apply_value(gm, group: SmoothGroup, act_max, weights, alpha: float) -> torch.Tensor:
    """Scale o's columns by s and v's output rows by 1/s (s shared across a KV group)."""
    heads, kv_heads, head_dim = group.heads
    o_weight = weights[0]
    k = o_weight.shape[1]
    v_weight = get_tensor(gm, group.fold["weight"])
    if None in group.heads or heads == kv_heads or v_weight.shape[0] == k:
        per_kv = smoothing_scales(act_max, weights, alpha)
        full = per_kv
    else:  # grouped-query: channel (g * n_rep + r, j) of o's input is channel (g, j) of v
        n_rep = heads // kv_heads
        act = act_max.reshape(kv_heads, n_rep, head_dim).amax(1).reshape(-1)
        w = o_weight.detach().reshape(-1, kv_heads, n_rep, head_dim).abs().amax(2).reshape(o_weight.shape[0], -1)
        per_kv = smoothing_scales(act, [w], alpha)
        full = per_kv.reshape(kv_heads, 1, head_dim).expand(kv_heads, n_rep, head_dim).reshape(-1)
    _scaled(gm, group.linears[0].tensors["weight"], full)
    _scaled(gm, group.fold["weight"], 1 / per_kv[:, None])
    if "bias" in group.fold:
        _scaled(gm, group.fold["bias"], 1 / per_kv)
    return full
