"""Structured pruning: remove whole MLP channels (``PruneChannels``) or attention heads (``PruneHeads``).

What is removed together comes from the IR's channel-dependency groups
(``rarefy.ir.structure``, networkx): an MLP intermediate group holds the up/gate rows (and
biases) and the down-projection columns of one block; an attention group holds the q/k/v rows
(and biases), the o-projection columns and every view/reshape/expand that names the head
count. The rewrite physically slices every weight of the group (smaller tensors replace the
old ones), rewrites the literal head counts in shape arguments (a symbolic entry fails with
a clear error) and updates the node metadata, so the graph exports to a smaller ONNX file.

Scores, per removable unit, summed over its channels ``j``:

* ``magnitude`` — squared L2 norm of every weight slice of the unit (Torch-Pruning's group norm);
* ``wanda`` — ``sum_i |W_ij| * ||X_j||`` on the consumer linear (Wanda, Sun et al. 2023,
  taken to whole columns);
* ``flap`` — the fluctuation ``Var(X_j) * ||W_:j||^2`` of the consumer's input channel over
  calibration tokens (FLAP, An et al. 2024), with FLAP's bias compensation: the removed
  channels' mean contribution ``W[:, removed] @ mean(X[removed])`` is added to the consumer's
  bias (a bias is created when there is none).

Ranking is *per block with a uniform fraction* (every selected block loses the same number of
units, ``floor(fraction * units)``; ``count=`` asks for an exact number per block). FLAP's
global, standardised ranking is not implemented. Grouped-query attention is pruned by whole
KV groups: a KV head and the query heads that read it go together, so ``num_heads`` stays a
multiple of ``num_kv_heads``; a unit of ``PruneHeads`` is a KV group (a head without GQA).
``fraction=0`` changes nothing. Both dialects: ONNX-dialect graphs (``rf.load`` of a file
exported from a Hugging Face model) get their groups from ``rarefy.ir.onnx_structure`` and
their rewrite from ``prune_onnx`` (new initializers, patched Reshape/Expand shape constants,
calibration statistics from ONNX Runtime); scoring is this module's, shared.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..ir.calibration import run_lockstep
from ..ir.errors import UnsupportedError
from ..ir.causal_lm import CausalLM
from ..ir.fx_utils import add_tensor, get_attr_node, get_tensor, resize_meta, set_tensor
from ..ir.onnx_structure import onnx_dependency_groups
from ..ir.structure import SHAPE_ARG_OPS, DependencyGroup, dependency_groups
from . import args
from .base import Pass, PassResult

METHODS = ("magnitude", "wanda", "flap")


class _PruneStructure(Pass):
    """Shared driver of the structured pruning passes; subclasses name the group kind (and, by
    defining ``call``, register themselves: this base is not a pass of its own)."""

    group_kind: ClassVar[str]
    unit_name: ClassVar[str]
    dialects = ("fx", "onnx")

    def __init__(self, fraction: float = 0.0, method: str = "magnitude", count: int | None = None, *,
                 targets=None, ignore=None, budget=None):
        super().__init__(targets=targets, ignore=ignore, budget=budget)
        fraction = args.number(self.name, "fraction", fraction)
        count = args.integer(self.name, "count", count, optional=True)
        method = args.choice(self.name, "method", method, METHODS)
        if not 0.0 <= fraction < 1.0:
            raise UnsupportedError(f"{self.name}: fraction={fraction} must be in [0, 1): some units must remain")
        if count is not None and (not isinstance(count, int) or count < 0):
            raise UnsupportedError(f"{self.name}: count={count!r} must be a non-negative int")
        if method not in METHODS:
            raise UnsupportedError(f"{self.name}: unknown method {method!r}; choose one of {METHODS}")
        self.fraction, self.method, self.count = fraction, method, count
        self.needs_calibration = method != "magnitude"

    # -- analysis ---------------------------------------------------------------------------------
    def _plan(self, graph) -> tuple[dict[str, tuple[DependencyGroup, int]], list[str]]:
        """{block: (group, units to remove)} and the notes of every block left alone."""
        all_groups = dependency_groups(graph) if graph.dialect == "fx" else onnx_dependency_groups(graph)
        groups = [g for g in all_groups if g.kind == self.group_kind]
        notes = [f"group {g.index} ({', '.join(g.blocks) or 'no block'}): not pruned ({g.reason})"
                 for g in all_groups if not g.prunable and g.kind in (self.group_kind, "hidden")]
        by_block = {g.blocks[0]: g for g in groups if g.prunable}
        chosen, skipped = self.select(sorted(by_block))
        notes += [f"{block}: skipped ({why})" for block, why in skipped.items()]
        unreadable = [g for g in groups if getattr(g, "error", "") and g.blocks[0] in self.select(g.blocks)[0]]
        if unreadable:  # a shape the analysis cannot read must not be skipped silently
            raise UnsupportedError(unreadable[0].error)
        plan = {}
        for block in chosen:
            group = by_block[block]
            remove = self.count if self.count is not None else math.floor(self.fraction * group.units)
            if remove == 0:
                notes.append(f"{block}: nothing to remove (fraction {self.fraction} of {group.units} "
                             f"{self.unit_name} rounds to 0)")
                continue
            plan[block] = (group, remove)
        return plan, notes

    def requires(self, graph, ctx) -> None:
        plan, _ = self._plan(graph)
        for block, (group, remove) in plan.items():
            if remove >= group.units:
                raise UnsupportedError(
                    f"cannot remove {remove} {self.unit_name} from {block}, which has {group.units}: "
                    f"at least one must remain"
                )

    def _prune(self, graph, ctx) -> PassResult:
        plan, notes = self._plan(graph)
        stats = {f"pruned_{self.unit_name}": 0, "pruned_blocks": 0, "bias_compensated": 0}
        if not plan:
            return PassResult(graph, False, stats, notes)
        groups = [group for group, _ in plan.values()]
        if graph.dialect == "onnx":
            from .prune_onnx import OnnxRewrite

            rewrite = OnnxRewrite(graph, groups)
        else:
            rewrite = _FxRewrite(graph)
        activations = {}
        if self.method != "magnitude":
            activations = rewrite.input_stats(groups, ctx.batches, ctx.progress)
        details = {}
        for block, (group, remove) in plan.items():
            scores = unit_scores(rewrite.tensor, group, self.method, activations)
            order = torch.argsort(scores, stable=True)
            removed = sorted(order[:remove].tolist())
            keep = sorted(order[remove:].tolist())
            if self.method == "flap":
                stats["bias_compensated"] += rewrite.compensate_bias(group, removed, activations)
            rewrite.prune(group, keep)
            stats[f"pruned_{self.unit_name}"] += remove
            stats["pruned_blocks"] += 1
            details[block] = {"units": group.units, "removed": removed, "scores": _score_summary(scores)}
            which = removed if len(removed) <= 16 else f"{len(removed)}"
            notes.append(f"{block}: removed {self.unit_name} {which} of {group.units} (lowest {self.method} scores)")
            self._record(graph, block, group, len(keep))
        if isinstance(graph, CausalLM):  # its cache tensors lost heads with the k/v projections
            graph.refresh_signature()
        return PassResult(graph, True, stats, notes, details)

    def _record(self, graph, block: str, group: DependencyGroup, kept: int) -> None:
        """Subclasses note what changed in graph.meta (head counts)."""


class PruneChannels(_PruneStructure):
    """Remove MLP intermediate channels per block (magnitude / Wanda / FLAP scores)."""

    group_kind = "mlp_channels"
    unit_name = "channels"

    def call(self, graph, ctx) -> PassResult:
        return self._prune(graph, ctx)


class PruneHeads(_PruneStructure):
    """Remove attention heads per block; with grouped-query attention, whole KV groups."""

    group_kind = "attention_heads"
    unit_name = "heads"

    def call(self, graph, ctx) -> PassResult:
        return self._prune(graph, ctx)

    def _record(self, graph, block, group, kept) -> None:
        config = getattr(group, "head_counts", None) or graph.meta.get("config") or {}
        heads = config.get("num_attention_heads") or config.get("num_heads") or group.units
        kv_heads = config.get("num_key_value_heads") or config.get("num_kv_heads") or heads
        pruned = graph.meta.setdefault("pruned_heads", {})
        before = pruned.get(block, {"num_heads": heads, "num_kv_heads": kv_heads})
        n_rep = before["num_heads"] // before["num_kv_heads"]
        kv_after = kept if before["num_kv_heads"] == group.units else before["num_kv_heads"]
        pruned[block] = {"num_heads": kv_after * n_rep, "num_kv_heads": kv_after}


# -- statistics and scores ---------------------------------------------------------------------------
def _score_summary(scores: torch.Tensor):
    """Every score for a few units (heads); quantiles for many (channels), to keep reports small."""
    if scores.numel() <= 64:
        return [round(float(s), 6) for s in scores]
    q = torch.quantile(scores, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=scores.dtype))
    return {"min": float(q[0]), "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]), "max": float(q[4])}


def consumer_input_stats(graph, consumers: set[str], batches: list, progress: bool) -> dict[str, dict]:
    """Per consumer weight: channel sum, sum of squares and token count of the linear's input."""
    by_node = {}
    for node in graph.fx.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.linear.default \
                and node.args[1].op == "get_attr" and node.args[1].target in consumers:
            by_node[node] = node.args[1].target
    stats: dict[str, dict] = {}

    def hook(node, per_batch):
        target = by_node.get(node)
        if target is None:
            return
        acc = stats.setdefault(target, {"sum": 0, "sum_sq": 0, "count": 0})
        for args, _ in per_batch:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            acc["sum"] = acc["sum"] + x.sum(0)
            acc["sum_sq"] = acc["sum_sq"] + (x * x).sum(0)
            acc["count"] += x.shape[0]

    run_lockstep(graph, batches, hook, progress=progress, desc="structured pruning statistics", until=by_node)
    return stats


def _per_unit(values: torch.Tensor, units: int) -> torch.Tensor:
    return values.reshape(units, -1).sum(1)


def unit_scores(tensor, group: DependencyGroup, method: str, activations: dict) -> torch.Tensor:
    """One importance score per unit of the group (higher = keep); ``tensor(key)`` reads a weight
    (nn.Linear ``[N, K]`` layout) or bias of the group."""
    if method == "magnitude":
        total = torch.zeros(group.units, dtype=torch.float64)
        for target, dims in group.params.items():
            value = tensor(target).detach().to(torch.float64)
            for dim, _ in dims:
                per_channel = value.pow(2).transpose(0, dim).reshape(value.shape[dim], -1).sum(1)
                total += _per_unit(per_channel, group.units)
        return total
    total = torch.zeros(group.units, dtype=torch.float64)
    for target in group.consumers:
        weight = tensor(target).detach().to(torch.float64)
        acc = activations[target]
        if method == "wanda":
            per_channel = (weight.abs() * acc["sum_sq"].sqrt()).sum(0)
        else:  # flap: sample variance of the input channel times the squared column norm
            mean = acc["sum"] / acc["count"]
            variance = (acc["sum_sq"] / acc["count"] - mean * mean).clamp_min(0)
            per_channel = variance * weight.pow(2).sum(0)
        total += _per_unit(per_channel, group.units)
    return total


# -- the rewrite -----------------------------------------------------------------------------------
class _FxRewrite:
    """The FX-dialect side of the rewrite (the ONNX side is ``prune_onnx.OnnxRewrite``)."""

    def __init__(self, graph):
        self.graph, self.gm = graph, graph.fx

    def tensor(self, target: str) -> torch.Tensor:
        return get_tensor(self.gm, target)

    def input_stats(self, groups, batches, progress) -> dict:
        return consumer_input_stats(self.graph, {c for g in groups for c in g.consumers}, batches, progress)

    def compensate_bias(self, group, removed, activations) -> int:
        return compensate_bias(self.gm, group, removed, activations)

    def prune(self, group, keep) -> None:
        prune_group(self.gm, group, keep)


def flap_delta(weight: torch.Tensor, group: DependencyGroup, removed: list[int], acc: dict) -> torch.Tensor:
    """FLAP: the removed channels' mean contribution ``W[:, removed] @ mean(x[removed])``."""
    columns = group.indices(weight.shape[1], removed)
    mean = (acc["sum"] / acc["count"])[columns].to(weight.dtype)
    return weight.detach()[:, columns] @ mean


def compensate_bias(gm, group: DependencyGroup, removed: list[int], activations: dict) -> int:
    """FLAP: bias += W[:, removed] @ mean(x[removed]) on every consumer linear; returns how many."""
    done = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is torch.ops.aten.linear.default
                and node.args[1].op == "get_attr" and node.args[1].target in group.consumers):
            continue
        weight = get_tensor(gm, node.args[1].target)
        delta = flap_delta(weight, group, removed, activations[node.args[1].target])
        bias = node.args[2] if len(node.args) > 2 else None
        if bias is not None:
            set_tensor(gm, bias.target, get_tensor(gm, bias.target).detach() + delta)
        else:
            name = add_tensor(gm, f"{node.args[1].target}.flap_bias", delta)
            node.args = (node.args[0], node.args[1], get_attr_node(gm, node, name))
        done += 1
    return done


def prune_group(gm, group: DependencyGroup, keep: list[int]) -> None:
    """Slice every weight of the group to the kept units and fix shapes and metadata."""
    for target, dims in group.params.items():
        tensor = get_tensor(gm, target).detach()
        for dim, size in dims:
            tensor = tensor.index_select(dim, group.indices(size, keep))
        set_tensor(gm, target, tensor)
    new_sizes: dict[str, dict[int, int]] = {}
    for (name, dim), size in group.slots.items():
        new_sizes.setdefault(name, {})[dim] = size // group.units * len(keep)
    for node in gm.graph.nodes:
        if node.name not in new_sizes:
            continue
        if node.op == "call_function" and node.target in SHAPE_ARG_OPS:
            _patch_shape_arg(node, new_sizes[node.name], group)
        resize_meta(node, new_sizes[node.name])


def _patch_shape_arg(node, sizes: dict[int, int], group: DependencyGroup) -> None:
    shape = list(node.args[1])
    for dim, new in sizes.items():
        entry = shape[dim]
        if isinstance(entry, int):
            if entry != -1:
                shape[dim] = new
        else:
            raise UnsupportedError(
                f"{node.name} ({node.target}) gives dim {dim} of the pruned group {group.index} as the symbolic "
                f"expression {entry}; only literal sizes or -1 can be rewritten"
            )
    node.args = (node.args[0], shape, *node.args[2:])
