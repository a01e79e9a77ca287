"""``SplitOutliers``: keep an MLP's outlier hidden units in full precision, an exact rewrite.

Method: LLM.int8()'s mixed-precision decomposition (Dettmers et al. 2022, "LLM.int8(): 8-bit
Matrix Multiplication for Transformers at Scale", section 3.2) computes the few input feature
dimensions that carry outliers in 16 bits and the rest in int8, choosing them per batch at run
time. At the input of an MLP's down projection (``down(act(up(x)))``, or
``down(act(gate(x)) * up(x))``) those dimensions are hidden *units*, and which units they are
hardly changes from text to text (all-MiniLM-L6-v2: one or two GELU units in each of layers 0-3
reach 14-24 on any text, every other unit stays under ~7), so the split can be chosen once, on
calibration data, and made static and exact: the unit's rows of the up (and gate) projection,
its activation and its column of the down projection are copied to a side branch and zeroed in
the main one (whose shapes stay as they were: int8 kernels like aligned widths), and the MLP
computes

    down_main(act(up_main(x))) + down_side(act(up_side(x)))

which equals the original up to the order of an fp32 sum (the zeroed units carry ``act(0)``
-- 0 for GELU / SiLU / ReLU / tanh -- into a zeroed column). The side branch's linears are marked
to stay in full precision (``KEEP_PRECISION``; ``QuantizeActivations``, ``QuantizeWeights`` and
``MixedPrecision`` skip them), so the main down projection's activation scale no longer has to
span the outliers: a per-tensor int8 scale covers the remaining units 2-4x more finely. It is
the aim of outlier channel splitting (OCS, Zhao et al. 2019), reached here by moving channels
rather than halving them.

Units: those whose ``max |input|`` over the calibration tokens exceeds ``ratio`` times the
median live unit's (units never above zero are left out of the median), the largest first, at
most ``max_fraction`` of the MLP's units. Cost at run time, per split MLP: two matmuls
``tokens x hidden x units`` and ``tokens x units x hidden`` and one add of the output (MiniLM,
4 of 6 MLPs split: 0.5-1.5% of an int8 run on ONNX Runtime; per-tensor W8A8 cosine 0.9927 ->
0.9959, ``benchmarks/quantize_minilm.py``).
Dialect: FX. Run it before the quantization passes, in the same pipeline: the mark lives on the
FX graph, so an fp32 ONNX export of the split graph, loaded again, quantizes its side branch too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.calibration import linear_input_stats
from ..ir.errors import UnsupportedError
from ..ir.fx_utils import add_tensor, get_tensor, resize_meta, set_tensor, shared_weights
from ..ir.sites import KEEP_PRECISION, module_path
from . import args
from .base import Pass, PassResult

aten = torch.ops.aten
_ACTIVATIONS = {aten.gelu.default, aten.silu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default}
_PASSTHROUGH = {aten.dropout.default, aten.clone.default, aten.alias.default, aten.contiguous.default}
_GATES = {aten.mul.Tensor}  # gated MLPs: act(gate(x)) * up(x)
_NOT_AN_MLP = "its input comes from"


@dataclass
class HiddenUnits:
    """An MLP's hidden units: the linears that produce them, the ops between, the one that reads them."""

    down: object  # the down projection's linear site
    ups: list  # linear sites whose output units are the down projection's input channels
    chain: list  # elementwise nodes from the ups to the down projection, in graph order


class SplitOutliers(Pass):
    """Outlier hidden units of MLPs moved to a full-precision side branch (exact)."""

    exact = True
    # The down projection's sum is split in two, and the side part holds the largest activations of
    # the model (SmolLM2: up to 2377), so the fp32 re-ordering moves its logits (|y| ~ 40) by up to
    # 1.7e-4 (116 dB SQNR); 1e-3 stays 100x below what int8 activations add (MiniLM: 0.2-2).
    tolerance = 1e-3
    needs_calibration = True
    dialects = ("fx",)
    must_run_before = ("QuantizeActivations", "QuantizeWeights", "MixedPrecision")

    def __init__(self, ratio: float = 6.0, max_fraction: float = 0.01, *, targets=None, ignore=None, budget=None):
        """``ratio``: a unit is an outlier above ``ratio`` x the median live unit's max |input|;
        ``max_fraction``: at most this share of an MLP's units is split off (at least one).
        ``targets`` / ``ignore`` select down projections by name."""
        super().__init__(targets=targets, ignore=ignore, budget=budget)
        self.ratio = args.number(self.name, "ratio", ratio, low=1, low_open=True)  # LLM.int8()-style: 6
        self.max_fraction = args.number(self.name, "max_fraction", max_fraction, low=0, high=0.5, low_open=True)

    def plan(self, graph) -> tuple[list[HiddenUnits], dict[str, str]]:
        """The MLPs whose units can be split, and {down projection name: why not} for the others."""
        sites = [s for s in graph.sites("linear") if not s.info.get(KEEP_PRECISION)]
        names, skipped = self.select([s.name for s in sites])
        by_node = {s.nodes[0]: s for s in sites}
        shared = shared_weights(graph.fx)
        mlps, chosen = [], set(names)
        for site in (s for s in sites if s.name in chosen):
            mlp, why = hidden_units(site, by_node)
            if mlp is not None and any(s.tensors["weight"] in shared for s in [site, *mlp.ups]):
                mlp, why = None, "a weight of this MLP is shared with another op (tied)"
            if mlp is None:
                skipped[site.name] = why
            else:
                mlps.append(mlp)
        return mlps, skipped

    def requires(self, graph, ctx) -> None:
        if not self.plan(graph)[0]:
            raise UnsupportedError("no linear in this graph reads an MLP's hidden units (up projection, "
                                   "activation, down projection) matching targets= / ignore=; nothing to split")

    def call(self, graph, ctx) -> PassResult:
        mlps, skipped = self.plan(graph)
        stats = linear_input_stats(graph, ctx.batches, [m.down for m in mlps], ("abs_max",), progress=ctx.progress)
        elsewhere = sorted(n for n, why in skipped.items() if why.startswith(_NOT_AN_MLP))
        notes = [f"{name}: not split ({why})" for name, why in skipped.items() if not why.startswith(_NOT_AN_MLP)]
        if elsewhere:
            notes.append(f"{len(elsewhere)} linears do not read an MLP's hidden units (their input comes from a "
                         f"norm, a reshape, ...; the reason for each is in the details): {', '.join(elsewhere)}")
        details = {name: {"not_split": why} for name, why in skipped.items()}
        split = 0
        for mlp in mlps:
            peak = stats[mlp.down.name]["abs_max"].float()
            units = outlier_units(peak, self.ratio, self.max_fraction)
            median = live_median(peak)
            details[mlp.down.name] = {"units": units.tolist(), "unit_max": [round(float(peak[u]), 3) for u in units],
                                      "median_unit_max": round(median, 4)}
            if not len(units):
                notes.append(f"{mlp.down.name}: no unit above {self.ratio} x the median max |input| {median:.3g}")
                continue
            _split(graph.fx, mlp, units)
            split += 1
            notes.append(f"{mlp.down.name}: {len(units)} of {len(peak)} units to full precision (max |input| "
                         f"{', '.join(f'{float(peak[u]):.3g}' for u in units)}; median unit {median:.3g})")
        counts = {"split_mlp": split, "outlier_units": sum(len(d.get("units", ())) for d in details.values()),
                  "skipped": len(skipped)}
        return PassResult(graph, split > 0, counts, notes, details)


def live_median(peak: torch.Tensor) -> float:
    """The median of the units' ``peak`` over the live ones (dead units, never above zero, would
    pull it down); 0 when every unit is dead."""
    live = peak[peak > 0]
    return float(live.median()) if live.numel() else 0.0


def outlier_units(peak: torch.Tensor, ratio: float, max_fraction: float) -> torch.Tensor:
    """Indices (ascending) of the units whose ``peak`` exceeds ``ratio`` x the median live unit's,
    largest first, capped; none when every unit is dead."""
    median = live_median(peak)
    if median == 0.0:
        return torch.zeros(0, dtype=torch.long)
    above = (peak > ratio * median).nonzero().flatten()
    cap = max(1, int(max_fraction * peak.numel()))
    largest = above[peak[above].argsort(descending=True)][:cap]
    return largest.sort().values


def hidden_units(down, by_node: dict) -> tuple[HiddenUnits | None, str]:
    """Walk back from a linear's input through activations (and gating products) to the linears
    that produce its input channels; (None, reason) unless every op between only feeds the next."""
    down_node, k = down.nodes[0], down.info["in_features"]
    chain, ups, todo, seen = [], [], [down_node.args[0]], set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if not isinstance(node, torch.fx.Node):
            return None, "its input is not a graph value"
        site = by_node.get(node)
        if site is not None:
            if site.info["out_features"] != k:
                return None, f"{site.name} gives {site.info['out_features']} units, the input takes {k}"
            ups.append(site)
            continue
        if node.op != "call_function" or node.target not in _ACTIVATIONS | _PASSTHROUGH | _GATES:
            return None, f"{_NOT_AN_MLP} {node.name} ({node.target}), not from linears through activations"
        inputs = node.all_input_nodes
        if node.target in _GATES and len(inputs) != 2:
            return None, f"{node.name} multiplies by a constant, not by another unit of the MLP"
        chain.append(node)
        todo.extend(inputs)
    inside = set(chain) | {s.nodes[0] for s in ups}
    for node in inside:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.shape[-1] != k:
            return None, f"{node.name} is not laid out as [..., {k}] units"
        if any(user not in inside and user is not down_node for user in node.users):
            return None, f"{node.name} is also read outside the MLP"
    if not ups:
        return None, "no linear produces its input"
    order = {n: i for i, n in enumerate(down_node.graph.nodes)}
    return HiddenUnits(down, ups, sorted(chain, key=order.get)), ""


def _split(gm, mlp: HiddenUnits, units: torch.Tensor) -> None:
    """Rewrite ``down(chain(ups))`` as ``down_main(chain(ups_main)) + down_side(chain(ups_side))``.

    The main branch keeps its shapes (int8 kernels like aligned widths): the units' rows of the
    ups (and biases) and columns of the down projection are zeroed there, so those units carry
    ``act(0)`` (0 for GELU / SiLU / ReLU / tanh) and contribute nothing; the side branch computes them.
    """
    down_node = mlp.down.nodes[0]
    side: dict = {}
    with gm.graph.inserting_before(down_node):
        for up in mlp.ups:
            node = up.nodes[0]
            args = [node.args[0], _take(gm, up, "weight", units, 0)]
            if "bias" in up.tensors:
                args.append(_take(gm, up, "bias", units, 0))
                _zero(gm, up, "bias", units, 0)
            _zero(gm, up, "weight", units, 0)
            side[node] = _side_node(gm, node, aten.linear.default, tuple(args), len(units))
        for node in mlp.chain:
            side[node] = gm.graph.node_copy(node, lambda a: side.get(a, a))
            side[node].meta = dict(node.meta)
            resize_meta(side[node], {side[node].meta["val"].dim() - 1: len(units)})
        side_down = _side_node(gm, down_node, aten.linear.default,
                               (side[down_node.args[0]], _take(gm, mlp.down, "weight", units, 1)), None)
        _zero(gm, mlp.down, "weight", units, 1)
    with gm.graph.inserting_after(down_node):
        total = gm.graph.call_function(aten.add.Tensor, (down_node, side_down))
    total.meta = dict(down_node.meta)
    down_node.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)


def _take(gm, site, role: str, units: torch.Tensor, dim: int) -> torch.fx.Node:
    """A get_attr node for the ``units`` slice (along ``dim``) of a site's tensor, as a new attribute."""
    name = add_tensor(gm, f"{site.tensors[role]}.outlier_units", get_tensor(gm, site.tensors[role]).detach()
                      .index_select(dim, units))
    return gm.graph.get_attr(name)


def _zero(gm, site, role: str, units: torch.Tensor, dim: int) -> None:
    target = site.tensors[role]
    set_tensor(gm, target, get_tensor(gm, target).detach().index_fill(dim, units, 0.0))


def _side_node(gm, like: torch.fx.Node, target, args: tuple, units: int | None) -> torch.fx.Node:
    """A full-precision linear of the side branch, named ``<module>.outlier_units`` in site listings."""
    node = gm.graph.call_function(target, args)
    node.meta = dict(like.meta)
    path = module_path(like)
    stack = dict(node.meta.get("nn_module_stack") or {})
    stack["outlier_units"] = (f"{path}.outlier_units" if path else "outlier_units", "SplitOutliers")
    node.meta["nn_module_stack"] = stack
    node.meta[KEEP_PRECISION] = True
    if units is not None:
        resize_meta(node, {node.meta["val"].dim() - 1: units})
    return node
