"""Layer dropping: ``DropLayers`` — remove the most redundant blocks or sublayers.

Units: ``block`` (a whole transformer layer), ``attention`` or ``mlp`` (one sublayer of
each block; attention sublayers are known to be the most redundant, He et al. 2024, "What
Matters in Transformers? Not All Attention is Needed").

Metrics (computed on the calibration batches before anything is removed):
* ``cosine``: Block Influence, ``1 - cos(h_in, h_out)`` between the hidden state entering a
  unit and the one leaving it, averaged over tokens (Men et al. 2024, ShortGPT). For a
  sublayer the input is the residual stream before it and the output the stream after its
  residual add (after the LayerNorm in a post-norm encoder).
* ``ppl``: the loss increase when that unit alone is bypassed: mean next-token NLL (nats)
  for a causal LM (its first output is logits over the config's vocabulary); otherwise the relative
  squared error of the model's first output, ``||y' - y||^2 / ||y||^2`` (no language-model
  loss exists for an encoder).

Schedule: one-shot (default) scores every unit once and removes the ``count`` (or
``floor(fraction * units)``) lowest; ``iterative=True`` removes one unit at a time and scores
the rest again with the removed ones already bypassed (SLEB, Song et al. 2024: units that are
redundant alone are often not redundant together). Iterative costs ``count`` scoring rounds.
Removal is a residual bypass: uses of the unit's output are replaced by its input and the dead
nodes and tensors are deleted. Pre-norm sublayers and whole blocks are exact bypasses
(``h + f(h) -> h``). A post-norm sublayer (BERT: ``LN(h + f(h))``) has no exact residual
bypass: rarefy maps its output to ``h``, dropping the LayerNorm with it, and the report says
so. FX dialect.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from ..eval.metrics import is_lm_logits, token_nll
from ..ir.errors import UnsupportedError
from ..ir.fx_utils import drop_unused_attrs
from ..ir.signature import split_inputs
from . import args
from .base import Pass, PassResult

log = logging.getLogger(__name__)

UNITS = ("block", "attention", "mlp")
METRICS = ("cosine", "ppl")
_ADD = torch.ops.aten.add.Tensor
_NORMS = (torch.ops.aten.layer_norm.default, torch.ops.aten.native_layer_norm.default)


@dataclass
class Unit:
    """A removable piece of the residual stream: bypassing it maps ``output`` to ``input``."""

    name: str
    kind: str
    index: int
    input: torch.fx.Node
    output: torch.fx.Node
    post_norm: bool = False


# -- finding units ------------------------------------------------------------------------------
def find_units(graph, kind: str) -> tuple[list[Unit], list[str]]:
    """The units of ``kind`` in graph order, and a note for every block that has none."""
    units, notes = [], []
    for block in graph.sites("block"):
        if kind == "block":
            unit, why = _block_unit(block)
        else:
            linears = block.info["attention_linears" if kind == "attention" else "mlp_linears"]
            unit, why = _sublayer_unit(graph, block, kind, linears)
        if unit is None:
            notes.append(f"{block.name}: no {kind} unit ({why})")
        else:
            units.append(unit)
    return units, notes


def _shape(node) -> str | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return str(list(val.shape)) if isinstance(val, torch.Tensor) else None


def _block_unit(block) -> tuple[Unit | None, str]:
    hidden = block.info.get("hidden_input")
    if hidden is None:
        return None, "its residual-stream input was not found"
    outputs = [n for n in block.info["outputs"] if _shape(n) == _shape(hidden)]
    if len(outputs) != 1:
        return None, f"{len(outputs)} outputs have the shape of its input {_shape(hidden)}; need exactly 1"
    return Unit(block.name, "block", block.index, hidden, outputs[0]), ""


def _sublayer_unit(graph, block, kind: str, linears: list[str]) -> tuple[Unit | None, str]:
    """The residual add ``h + f(h)`` of the sublayer made of ``linears``: the first add in the
    block with one operand downstream of those linears and the other, of the same shape, not."""
    if not linears:
        return None, f"the block has no {kind} linears"
    by_name = {s.name: s.nodes[0] for s in graph.sites("linear")}
    in_block = set(block.nodes)
    downstream = {by_name[n] for n in linears if n in by_name}
    for node in block.nodes:  # block.nodes are in graph order
        if node not in downstream and any(a in downstream for a in node.all_input_nodes):
            downstream.add(node)
        if node.target is not _ADD or len(node.args) < 2 or node not in downstream:
            continue
        a, b = node.args[:2]
        residual = b if a in downstream else a
        if isinstance(residual, torch.fx.Node) and residual not in downstream and _shape(residual) == _shape(node):
            users = [u for u in node.users if u in in_block or u.op == "output"]
            norm = users[0] if len(node.users) == 1 and users and users[0].target in _NORMS else None
            name = _common_prefix(linears) or f"{block.name}.{kind}"
            if name == block.name:  # BERT's MLP spans `intermediate` and `output`
                name = f"{block.name}.{kind}"
            return Unit(name, kind, block.index, residual, norm or node, post_norm=norm is not None), ""
    return None, f"no residual add after the {kind} linears"


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    if len(common) == min(len(p) for p in parts):
        common = common[:-1]  # a single linear: its parent module
    return ".".join(common)


# -- scoring (compute) --------------------------------------------------------------------------------
class _Probe(torch.fx.Interpreter):
    """Runs the graph once with some units bypassed, accumulating the others' token cosines."""

    def __init__(self, gm, units: list[Unit], bypassed: tuple[Unit, ...] = ()):
        super().__init__(gm, garbage_collect_values=True)
        self.bypassed = {u.output: u.input for u in bypassed}  # output node -> the node it is replaced by
        self.by_input: dict = {}
        self.by_output: dict = {}
        for u in units:
            if u.output not in self.bypassed:
                self.by_input.setdefault(u.input, []).append(u)
                self.by_output.setdefault(u.output, []).append(u)
        self.watched = set(self.by_input) | set(self.bypassed.values())
        self.saved: dict = {}
        self.cos_sum: dict[str, float] = {u.name: 0.0 for units_ in self.by_output.values() for u in units_}
        self.tokens = 0

    def run_node(self, n):
        out = self.saved[self.bypassed[n]] if n in self.bypassed else super().run_node(n)
        if n in self.watched:
            self.saved[n] = out
        for unit in self.by_output.get(n, []):
            h_in = self.saved[unit.input].reshape(-1, out.shape[-1]).double()
            h_out = out.reshape(-1, out.shape[-1]).double()
            self.cos_sum[unit.name] += float(torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).sum())
            self.tokens = h_out.shape[0]
        return out


def _run(graph, batch, units, bypassed: tuple[Unit, ...] = ()) -> tuple[list, _Probe]:
    probe = _Probe(graph.fx, units, bypassed)
    leaves = graph.batch_leaves(batch)
    with torch.no_grad():
        out = probe.run(*leaves)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)], probe


def cosine_scores(graph, units: list[Unit], batches: list, bypassed: tuple[Unit, ...] = ()) -> dict[str, float]:
    """Block Influence ``1 - mean_token cos(h_in, h_out)`` of every unit not in ``bypassed``."""
    sums: dict[str, float] = {}
    tokens = 0
    for batch in batches:
        _, probe = _run(graph, batch, units, bypassed)
        for name, value in probe.cos_sum.items():
            sums[name] = sums.get(name, 0.0) + value
        tokens += probe.tokens
    return {name: 1 - s / tokens for name, s in sums.items()}


class IntactLoss:
    """The intact model's outputs on the calibration batches and its loss, computed once and
    shared by every scoring round."""

    def __init__(self, graph, units: list[Unit], batches: list):
        self.batches = batches
        self.outputs = [_run(graph, b, units)[0] for b in batches]
        vocab = (graph.meta.get("config") or {}).get("vocab_size")
        self.lm = all(is_lm_logits(split_inputs(b)[1].get("input_ids"), out, vocab)
                      for b, out in zip(batches, self.outputs))
        self.what = "mean next-token NLL increase (nats)" if self.lm else \
            "relative squared error of the first output (the model is not a causal LM)"
        self.value = self.loss(self.outputs)

    def loss(self, outputs_per_batch) -> float:
        """Next-token NLL of a causal LM's logits; otherwise the first output's relative squared
        error against the intact model's."""
        if self.lm:
            total, count = token_nll(lambda **kw: kw["_logits"], [
                {**split_inputs(b)[1], "_logits": out[0]} for b, out in zip(self.batches, outputs_per_batch)])
            return total / count
        errors = [float((o[0] - r[0]).double().pow(2).sum() / r[0].double().pow(2).sum().clamp_min(1e-30))
                  for o, r in zip(outputs_per_batch, self.outputs)]
        return sum(errors) / len(errors)


def loss_scores(graph, units: list[Unit], intact: IntactLoss, progress: bool,
                bypassed: tuple[Unit, ...] = ()) -> dict[str, float]:
    """Loss increase over the intact model when each unit not in ``bypassed`` is bypassed too."""
    scores = {}
    candidates = [u for u in units if u not in bypassed]
    for unit in tqdm(candidates, desc="DropLayers: bypassing units", disable=not progress, leave=False):
        outputs = [_run(graph, b, units, (*bypassed, unit))[0] for b in intact.batches]
        scores[unit.name] = intact.loss(outputs) - intact.value
    return scores


# -- rewrite (convert) -----------------------------------------------------------------------------------
def bypass_units(graph, units: list[Unit]) -> int:
    """Map each unit's output to its input, then delete what no longer reaches the outputs."""
    gm = graph.fx
    replaced: dict = {}
    for unit in units:  # in graph order: a unit's input may be a dropped unit's output
        source = unit.input
        while source in replaced:
            source = replaced[source]
        unit.output.replace_all_uses_with(source)
        replaced[unit.output] = source
    erased = _erase_dead(gm)
    drop_unused_attrs(gm)
    return erased


def _erase_dead(gm) -> int:
    """Erase nodes the outputs no longer depend on, including assertions about dead values."""
    graph = gm.graph
    live, stack = set(), [n for n in graph.nodes if n.op in ("output", "placeholder")]
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    erased = 0
    for node in reversed(list(graph.nodes)):
        if node in live or node.users:
            continue
        if node.is_impure() and all(a in live for a in node.all_input_nodes):
            continue  # an assertion about a live value: keep it
        graph.erase_node(node)
        erased += 1
    return erased


class DropLayers(Pass):
    """Remove the ``count`` most redundant blocks / attention / MLP sublayers by residual bypass."""

    needs_calibration = True

    def __init__(self, count: int | None = None, fraction: float | None = None, unit: str = "block",
                 metric: str = "cosine", iterative: bool = False, *, targets=None, ignore=None, budget=None):
        super().__init__(targets=targets, ignore=ignore, budget=budget)
        count = args.integer(self.name, "count", count, low=0, optional=True)
        fraction = args.number(self.name, "fraction", fraction, low=0, high=1, high_open=True, optional=True)
        args.flag(self.name, "iterative", iterative)
        if unit not in UNITS:
            raise UnsupportedError(f"DropLayers: unknown unit {unit!r}; choose one of {UNITS}")
        if metric not in METRICS:
            raise UnsupportedError(f"DropLayers: unknown metric {metric!r}; choose one of {METRICS}")
        if (count is None) == (fraction is None):
            raise UnsupportedError("DropLayers: give exactly one of count= or fraction=")
        self.count, self.fraction, self.unit, self.metric, self.iterative = count, fraction, unit, metric, iterative

    def plan(self, graph) -> tuple[list[Unit], int, list[str]]:
        """(candidate units, how many to drop, notes)."""
        units, notes = find_units(graph, self.unit)
        names, skipped = self.select([u.name for u in units])
        notes += [f"{name}: not a candidate ({why})" for name, why in skipped.items()]
        chosen = [u for u in units if u.name in set(names)]
        count = self.count if self.count is not None else math.floor(self.fraction * len(units) + 1e-9)
        return chosen, count, notes

    def requires(self, graph, ctx) -> None:
        units, count, notes = self.plan(graph)
        if not units:
            raise UnsupportedError(f"no {self.unit} units found ({'; '.join(notes[:3]) or 'no blocks'})")
        if count >= len(units):
            raise UnsupportedError(
                f"dropping {count} of {len(units)} {self.unit} units would remove every one; choose fewer")

    def call(self, graph, ctx) -> PassResult:
        units, count, notes = self.plan(graph)
        if count == 0:
            return PassResult(graph, False, {"dropped": 0, "scored": 0}, notes + ["count is 0: nothing to drop"])
        dropped: list[Unit] = []
        scores: dict[str, float] = {}
        rounds = count if self.iterative else 1
        intact = IntactLoss(graph, units, ctx.batches) if self.metric == "ppl" else None
        for _ in tqdm(range(rounds), desc="DropLayers: rounds", disable=not ctx.progress or rounds == 1, leave=False):
            round_scores, what = self._scores(graph, units, ctx, tuple(dropped), intact)
            scores.update(round_scores)
            remaining = sorted((u for u in units if u not in dropped), key=lambda u: scores[u.name])
            dropped += remaining[:1] if self.iterative else remaining[:count]
        order = dropped + sorted((u for u in units if u not in dropped), key=lambda u: scores[u.name])
        details = {u.name: {"score": scores[u.name], "rank": order.index(u) + 1, "dropped": u in dropped,
                            "why": _why(scores[u.name], u in dropped, count, what, self.iterative)} for u in units}
        details["metric"] = what + (" (iterative: each unit scored with the previously dropped ones bypassed)"
                                    if self.iterative else "")
        dropped = sorted(dropped, key=lambda u: u.index)
        post_norm = [u.name for u in dropped if u.post_norm]
        if post_norm:
            notes.append(f"post-norm sublayers {post_norm}: no exact residual bypass exists; LN(h + f(h)) "
                         f"was replaced by h, removing the LayerNorm too")
        how = (f"in {count} rounds, each the lowest {what} of the remaining" if self.iterative
               else f"the {count} lowest {what} of")
        notes.append(f"dropped {[u.name for u in dropped]}: {how} {len(units)} {self.unit} units")
        erased = bypass_units(graph, dropped)
        stats = {"dropped": len(dropped), "scored": len(units), "erased_nodes": erased}
        return PassResult(graph, True, stats, notes, details)

    def _scores(self, graph, units: list[Unit], ctx, bypassed: tuple[Unit, ...],
                intact: IntactLoss | None) -> tuple[dict[str, float], str]:
        """Scores of the units not in ``bypassed`` (with those bypassed), and what they measure."""
        if intact is None:
            return cosine_scores(graph, units, ctx.batches, bypassed), "1 - cosine(input, output) (Block Influence)"
        return loss_scores(graph, units, intact, ctx.progress, bypassed), intact.what


def _why(score: float, dropped: bool, count: int, what: str, iterative: bool) -> str:
    if iterative:
        verdict = "dropped: lowest of the remaining units in its round" if dropped else \
            f"kept: never the lowest in {count} rounds"
        return f"{verdict}, {what} (score {score:.4g}, from the last round that scored it)"
    verdict = "dropped: among" if dropped else "kept: not among"
    return f"{verdict} the {count} lowest {what} (score {score:.4g})"
