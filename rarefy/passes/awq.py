"""AWQ: ``QuantizeWeights(method="awq")`` — activation-aware per-input-channel scaling.

Paper: Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration" (MLSys 2024). Salient input channels (large
mean |x|) are protected by scaling them up before quantization and down in the activation:
``W x = (W diag(s)) (diag(s)^-1 x)``, with ``s = mean|x|^alpha`` normalised to
``sqrt(max s * min s) = 1`` and ``alpha`` searched on a grid of ``GRID`` values in [0, 1)
(``alpha = 0`` is plain RTN). The objective is the output error of the linears that share the
input, ``sum_l tr(dW_l H dW_l^T)`` with ``dW_l = W_l - Q(W_l diag(s)) diag(s)^-1`` and
``H = X^T X / n`` from calibration: exactly the mean squared output error, at the cost of one
``N x K x K`` product per candidate instead of a pass over the tokens (rows beyond
``SEARCH_ROWS`` are subsampled, which keeps a 49k-row LM head cheap).

Then AWQ's weight clipping (the reference's ``auto_clip``): for every row and group of the
scaled weight, the grid range is shrunk by ``1 - i / CLIP_GRID * CLIP_MAX_SHRINK`` and the
shrink with the smallest output error of that group, ``dw_g H_gg dw_g^T`` (``H`` of the scaled
input, its diagonal block for the group), is kept. As in the reference, query and key
projections are not clipped (their output error says little about the attention scores), a
grid follows its rows when a later fold rescales them (``down_proj``'s ``1/s`` into
``up_proj``), and per-channel grids (``group_size=None``) are not clipped (a whole row's range
is rarely set by one outlier, and the ``K x K`` block makes it costly).

Where ``diag(s)^-1`` goes (a graph rewrite that keeps the graph exact before quantization):
* folded into the op that produces the input, when the input feeds only these linears:
  an RMSNorm's weight multiply (``mul(weight, x)``), a LayerNorm's weight and bias, or the
  linear factor of a gated product (``down_proj`` <- ``up_proj`` in ``act(gate) * up``);
* otherwise (the input also feeds a residual, or comes through attention or a nonlinearity:
  BERT's LayerNorm outputs, ``o_proj``, GELU MLPs) an explicit ``x * (1/s)`` multiply is inserted
  before the linears, and the notes say so.
Scales are searched on the original (unquantized) model, one block of activations at a time
(``run_lockstep``), then applied, then every linear is rounded on the shared RTN grid.
Dialect: FX. Dtypes: fp32 / fp16.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ir.calibration import run_lockstep
from ..ir.errors import UnsupportedError
from ..ir.fx_utils import add_tensor, get_attr_node, get_tensor
from .gptq import to_blocks
from .quantize import WEIGHT_QUANTIZERS, dequantize_blocks, quantize_blocks, quantize_with, search_clip

GRID = 20  # alpha in {0, 1/20, ..., 19/20}, as in the reference implementation
SEARCH_ROWS = 2048  # output rows per linear used to score a candidate scale
CLIP_GRID, CLIP_MAX_SHRINK = 20, 0.5  # clip ranges 1, 0.975, ..., 0.525 of the group's (reference: n_grid=20, max_shrink=0.5)
UNCLIPPED = ("q_proj", "k_proj", "query", "key", "Wqkv", "qkv")  # name parts the reference does not clip

aten = torch.ops.aten


@dataclass
class ScaleGroup:
    """Linears that read one input, and the per-input-channel scale chosen for them."""

    source: torch.fx.Node
    sites: list
    scales: torch.Tensor | None = None
    alpha: float | None = None
    errors: dict[float, float] = field(default_factory=dict)  # alpha -> output error
    grids: dict[str, tuple] = field(default_factory=dict)  # site name -> clipped (scales, zeros) per group


class QuantizerResult(dict):
    """{site name: (codes, scales, zeros)} plus the notes and details of how they were chosen."""

    def __init__(self, weights: dict, notes: list[str], details: dict):
        super().__init__(weights)
        self.notes, self.details = notes, details


def scale_groups(sites: list) -> list[ScaleGroup]:
    """Group the chosen linear sites by the node they read, in graph order."""
    groups: dict = {}
    for site in sites:
        source = site.nodes[0].args[0]
        groups.setdefault(source, ScaleGroup(source, [])).sites.append(site)
    return list(groups.values())


def search_scales(graph, groups: list[ScaleGroup], batches: list, bits: int, group_size: int | None,
                  symmetric: bool, progress: bool = True) -> None:
    """Fill ``group.scales`` / ``alpha`` / ``errors`` from calibration, block by block."""
    gm = graph.fx
    first = {g.sites[0].nodes[0]: g for g in groups}

    def hook(node, per_batch):
        group = first.get(node)
        if group is None:
            return
        xs = [args[0].detach().reshape(-1, args[0].shape[-1]).float() for args, _ in per_batch]
        count = sum(x.shape[0] for x in xs)
        mean_abs = sum(x.abs().sum(0) for x in xs) / count
        h = sum(x.T @ x for x in xs) / count
        weights = [get_tensor(gm, site.nodes[0].args[1].target).detach().float() for site in group.sites]
        _choose_alpha(group, weights, mean_abs, h, bits, group_size, symmetric)
        if group_size is not None:
            scaled_h = h / group.scales[:, None] / group.scales[None, :]  # H of the input x / s
            for site, w in zip(group.sites, weights):
                if not any(part in site.name.split(".")[-1] for part in UNCLIPPED):
                    group.grids[site.name] = clip_grid(w * group.scales, scaled_h, bits, group_size, symmetric)

    run_lockstep(graph, batches, hook, progress=progress, desc="AWQ scale search", until=first)


def _choose_alpha(group: ScaleGroup, weights, mean_abs, h, bits, group_size, symmetric) -> None:
    rows = [w[torch.linspace(0, w.shape[0] - 1, SEARCH_ROWS).long()] if w.shape[0] > SEARCH_ROWS else w
            for w in weights]
    best = None
    for step in range(GRID):
        alpha = step / GRID
        s = mean_abs.clamp(min=1e-4) ** alpha
        s = s / (s.max() * s.min()).sqrt()
        error = 0.0
        for w in rows:
            codes, scales, zeros = quantize_blocks(w * s, bits, group_size, symmetric)
            dw = w - dequantize_blocks(codes, scales, zeros, w.shape[1]) / s
            error += float(((dw @ h) * dw).sum())  # tr(dW H dW^T): mean squared output error
        group.errors[alpha] = error
        if best is None or error < best[0]:
            best = (error, alpha, s)
    _, group.alpha, group.scales = best


def clip_grid(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """Per-group scales / zeros [N, n_groups] of ``w [N, K]`` with each group's clipping range
    chosen to minimise its output error ``dw_g H_gg dw_g^T``."""
    n, k = w.shape
    n_groups = -(-k // group_size)
    pad = n_groups * group_size - k
    padded = torch.nn.functional.pad(w, (0, pad)).reshape(n, n_groups, group_size)
    valid = (torch.arange(n_groups * group_size) < k).reshape(n_groups, group_size)
    h_blocks = torch.nn.functional.pad(h, (0, pad, 0, pad)).reshape(n_groups, group_size, n_groups, group_size)
    h_blocks = torch.diagonal(h_blocks, dim1=0, dim2=2).permute(2, 0, 1)  # [n_groups, g, g]
    shrinks = [1 - i / CLIP_GRID * CLIP_MAX_SHRINK for i in range(CLIP_GRID)]
    return search_clip(padded, valid, bits, symmetric, shrinks,
                       lambda dw: torch.einsum("ngi,gij,ngj->ng", dw, h_blocks, dw))


def quantize_on_grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int):
    """(codes, scales, zeros) of ``w [N, K]`` on given per-group grids, in ``quantize_blocks``' layout."""
    n, k = w.shape
    n_groups = scales.shape[1]
    padded = torch.nn.functional.pad(w.detach().float(), (0, n_groups * group_size - k)).reshape(n, n_groups, -1)
    codes = quantize_with(padded, scales, zeros, bits).reshape(n, -1)[:, :k]
    return to_blocks(codes.to(torch.uint8), scales, zeros, group_size)


def apply_scales(graph, groups: list[ScaleGroup]) -> list[str]:
    """Rewrite ``W -> W diag(s)`` and put ``diag(s)^-1`` before it (folded or inserted); notes."""
    gm = graph.fx
    notes = []
    clipped = {site.nodes[0]: (g.grids, site.name) for g in groups for site in g.sites if site.name in g.grids}

    def rows_scaled(node, factor):  # a fold scaled a clipped linear's rows: its grid scales with them
        if node in clipped:
            grids, name = clipped[node]
            scales, zeros = grids[name]
            grids[name] = (scales * factor.to(scales.dtype)[:, None], zeros)

    for group in groups:
        if group.scales is None or group.alpha == 0:
            notes.append(f"{_names(group)}: AWQ alpha=0 (plain rounding was best); unscaled")
            continue
        s = group.scales
        how = _try_fold(gm, group, rows_scaled) or _insert_inverse(gm, group)
        for site in group.sites:
            node = site.nodes[0]
            weight = get_tensor(gm, node.args[1].target)
            _replace_attr_input(gm, node, 1, f"{site.name}.awq_weight", weight * s.to(weight.dtype))
        notes.append(f"{_names(group)}: AWQ alpha={group.alpha:.2f}, 1/s {how}")
    return notes


def _try_fold(gm, group: ScaleGroup, rows_scaled) -> str | None:
    """Fold diag(s)^-1 into the op producing the input when that is exact; say where, or None.
    ``rows_scaled(linear_node, factor)`` is told when a linear's output rows are multiplied."""
    source, s = group.source, group.scales
    readers = {site.nodes[0] for site in group.sites}
    if set(source.users) != readers:
        return None  # the input also feeds something else (e.g. the residual)
    if source.target is aten.mul.Tensor:
        attrs = [a for a in source.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
        if len(attrs) == 1 and get_tensor(gm, attrs[0].target).shape == s.shape:
            position = source.args.index(attrs[0])  # an RMSNorm: weight * x
            weight = get_tensor(gm, attrs[0].target)
            _replace_attr_input(gm, source, position, f"{attrs[0].target}.awq", weight / s.to(weight.dtype))
            return f"folded into the norm weight {attrs[0].target}"
        factor = _linear_factor(source)
        if factor is not None:  # act(gate) * up: scale up's output rows
            weight = get_tensor(gm, factor.args[1].target)
            _replace_attr_input(gm, factor, 1, f"{factor.args[1].target}.awq", weight / s.unsqueeze(1).to(weight.dtype))
            rows_scaled(factor, 1 / s)
            bias = factor.args[2] if len(factor.args) > 2 else None
            if isinstance(bias, torch.fx.Node) and bias.op == "get_attr":
                b = get_tensor(gm, bias.target)
                _replace_attr_input(gm, factor, 2, f"{bias.target}.awq", b / s.to(b.dtype))
            return f"folded into the rows of {factor.args[1].target}"
    if source.target is aten.layer_norm.default and len(source.args) >= 4 \
            and all(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in source.args[2:4]):
        for position in (2, 3):
            t = get_tensor(gm, source.args[position].target)
            _replace_attr_input(gm, source, position, f"{source.args[position].target}.awq", t / s.to(t.dtype))
        return f"folded into the LayerNorm {source.args[2].target}"
    return None


def _linear_factor(mul: torch.fx.Node) -> torch.fx.Node | None:
    """The factor of an elementwise product that is a linear used only there (up_proj in a GLU)."""
    a, b = mul.args[:2]
    if a is b:
        return None
    for arg in (a, b):
        if isinstance(arg, torch.fx.Node) and arg.target is aten.linear.default and len(arg.users) == 1 \
                and isinstance(arg.args[1], torch.fx.Node) and arg.args[1].op == "get_attr":
            return arg
    return None


def _insert_inverse(gm, group: ScaleGroup) -> str:
    """No exact fold: ``x * (1/s)`` feeds the scaled linears (one extra elementwise multiply)."""
    first = group.sites[0].nodes[0]
    inverse = add_tensor(gm, f"{group.sites[0].name}.awq_inverse_scale", (1 / group.scales).to(_dtype(gm, first)))
    with gm.graph.inserting_before(first):
        scaled = gm.graph.call_function(aten.mul.Tensor, (group.source, get_attr_node(gm, first, inverse)))
    scaled.meta = {k: v for k, v in group.source.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")}
    for site in group.sites:
        site.nodes[0].replace_input_with(group.source, scaled)
    return "inserted as an explicit multiply (no exact fold: the input has other users or no foldable producer)"


def _dtype(gm, linear: torch.fx.Node) -> torch.dtype:
    return get_tensor(gm, linear.args[1].target).dtype


def _replace_attr_input(gm, node: torch.fx.Node, position: int, hint: str, value: torch.Tensor) -> None:
    """Point ``node.args[position]`` at a new attribute holding ``value`` (shared tensors stay intact)."""
    target = add_tensor(gm, hint, value)
    new = get_attr_node(gm, node, target)
    args = list(node.args)
    args[position] = new
    node.args = tuple(args)


def _names(group: ScaleGroup) -> str:
    return ", ".join(site.name for site in group.sites)


def _awq_weights(p, graph, sites, ctx) -> QuantizerResult:
    if graph.dialect != "fx":
        raise UnsupportedError("method 'awq' runs on FX-dialect graphs (capture the model with rf.capture)")
    groups = scale_groups(sites)
    search_scales(graph, groups, ctx.batches, p.bits, p.group_size, p.symmetric, progress=ctx.progress)
    notes = apply_scales(graph, groups)
    grids = {name: grid for g in groups for name, grid in g.grids.items()}
    weights = {}
    for site in sites:
        weight = get_tensor(graph.fx, site.nodes[0].args[1].target)
        weights[site.name] = (quantize_on_grid(weight, *grids[site.name], p.bits, p.group_size)
                              if site.name in grids else p.quantize(weight))
    clipped = sum(name in grids for name in weights)
    notes.append(f"AWQ weight clipping searched for {clipped} of {len(weights)} linears"
                 + ("" if p.group_size else " (per-channel grid: not clipped)"))
    details = {_names(g): {"alpha": g.alpha, "errors": {f"{a:.2f}": e for a, e in g.errors.items()},
                           "clipped": sorted(g.grids)} for g in groups}
    return QuantizerResult(weights, notes, details)


WEIGHT_QUANTIZERS["awq"] = _awq_weights
