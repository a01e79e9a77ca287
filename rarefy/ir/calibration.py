"""Calibration: validated batches, and a lock-step runner that keeps memory bounded.

``Calibration(batches)`` checks the data once (not empty, every floating input finite).
``run_lockstep(graph, batches, hook)`` executes an FX graph node by node *for all batches
at once* and frees each value after its last use. At any moment only the live activations
of the current transformer block are held (times the number of batches), never the whole
model's, which is what lets sequential methods (GPTQ, SparseGPT) calibrate block by block:
a hook sees every node's inputs for all batches, may compute statistics or rewrite the
node's weights, and the rewritten node's outputs feed the next block. A progress bar
advances one block at a time.

``linear_input_stats`` is the common case: per-linear statistics of the input
activations (channel sum of squares, abs max, abs mean, the Gram matrix X^T X).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from .errors import CalibrationError
from .signature import split_inputs

log = logging.getLogger(__name__)

STATS = ("sum_sq", "abs_max", "abs_sum", "gram")


class Calibration:
    """A list of batches (tuples or dicts of tensors), checked once, with a description."""

    def __init__(self, batches: Iterable[Any], description: str = "user-provided batches"):
        if isinstance(batches, Calibration):
            batches, description = batches.batches, batches.description
        if isinstance(batches, (torch.Tensor, dict)) or (isinstance(batches, tuple) and batches):  # () is no batch
            batches = [batches]
        self.batches = list(batches) if batches is not None else []
        self.description = description
        if not self.batches:
            raise CalibrationError("calibration set is empty: give at least one batch")
        for i, batch in enumerate(self.batches):
            args, kwargs = split_inputs(batch)
            named = [(f"argument {j}", a) for j, a in enumerate(args)] + list(kwargs.items())
            for name, value in named:
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                    bad = "NaN" if torch.isnan(value).any() else "inf"
                    raise CalibrationError(f"calibration batch {i}, input {name!r} contains {bad}")

    def __len__(self) -> int:
        return len(self.batches)

    def split_held_out(self) -> tuple["Calibration", list]:
        """Hold the last batch out for verification when no evaluation set was given."""
        if len(self.batches) < 2:
            return self, list(self.batches)
        head = Calibration(self.batches[:-1], self.description + " (all but the last batch)")
        return head, self.batches[-1:]


Hook = Callable[[torch.fx.Node, list[tuple[tuple, dict]]], None]


def run_lockstep(graph, batches: list, hook: Hook | None = None, progress: bool = True,
                 desc: str = "calibrating", after: Callable[[torch.fx.Node], None] | None = None,
                 until: Iterable[torch.fx.Node] | None = None) -> list[list[torch.Tensor]]:
    """Run ``graph`` (FX dialect) on every batch in lock step; returns flat outputs per batch.

    ``hook(node, per_batch_args)`` is called before each call_function node executes, with
    that node's (args, kwargs) for every batch; it may mutate module attributes (weights)
    the node reads: the node then runs with the new values. ``after(node)`` is called once
    the node has run on every batch (e.g. to release a weight nothing else reads). With
    ``until``, the run stops once all of those nodes have run (nothing downstream is computed,
    e.g. an LM head's batch x tokens x vocabulary logits) and the outputs come back empty.
    """
    gm = graph.fx
    leaves = [graph.batch_leaves(b) for b in batches]
    nodes = list(gm.graph.nodes)
    last_use = {}
    for i, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last_use[arg] = i
    block_of = _block_index_by_node(graph)
    env: dict[torch.fx.Node, list] = {}
    placeholder_index = 0
    outputs: list[list[torch.Tensor]] = [[] for _ in batches]
    bar = tqdm(total=max(block_of.values(), default=-1) + 2, desc=desc, disable=not progress, leave=False)
    current_block = -1
    pending = set(until) if until is not None else None
    with torch.no_grad():
        for i, node in enumerate(nodes):
            block = block_of.get(node)
            if block is not None and block != current_block:
                bar.update(block - current_block)
                current_block = block
            if node.op == "placeholder":
                env[node] = [b[placeholder_index] for b in leaves]
                placeholder_index += 1
            elif node.op == "get_attr":
                continue  # read live from the module, so hooks that rewrite weights take effect
            elif node.op in ("call_function", "call_module", "call_method"):
                per_batch = [_materialise(gm, node, env, b) for b in range(len(batches))]
                if hook is not None and node.op == "call_function":
                    hook(node, per_batch)
                    per_batch = [_materialise(gm, node, env, b) for b in range(len(batches))]
                env[node] = [_execute(gm, node, a, k) for a, k in per_batch]
                if after is not None and node.op == "call_function":
                    after(node)
                if pending is not None:
                    pending.discard(node)
                    if not pending:
                        break
            elif node.op == "output":
                for b in range(len(batches)):
                    flat = pytree.tree_leaves(torch.fx.node.map_arg(node.args[0], lambda n: env[n][b]))
                    outputs[b] = [t for t in flat if isinstance(t, torch.Tensor)]
            for arg in node.all_input_nodes:
                if last_use.get(arg) == i:
                    env.pop(arg, None)
    bar.update(bar.total - bar.n)
    bar.close()
    return outputs


def linear_input_stats(graph, batches: list, linear_sites: list, stats: tuple[str, ...] = ("sum_sq",),
                       progress: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Statistics of each linear site's input over all calibration tokens.

    Per site: ``sum_sq`` [K] (Σx², Wanda's ‖X_j‖²), ``abs_max`` [K] (SmoothQuant),
    ``abs_sum`` [K] (AWQ's mean |x| once divided by ``count``), ``gram`` [K, K] (X^T X, the
    GPTQ / SparseGPT Hessian up to a factor 2), and ``count`` (tokens seen). fp64 sums.
    """
    unknown = set(stats) - set(STATS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; known: {STATS}")
    by_node = {site.nodes[0]: site.name for site in linear_sites}
    result: dict[str, dict[str, torch.Tensor]] = {}

    def hook(node, per_batch):
        name = by_node.get(node)
        if name is None:
            return
        acc = result.setdefault(name, {"count": torch.zeros((), dtype=torch.float64)})
        for args, _ in per_batch:
            accumulate(acc, args[0], stats)

    run_lockstep(graph, batches, hook, progress=progress, desc="calibration statistics", until=by_node)
    return result


def accumulate(acc: dict, x: torch.Tensor, stats: tuple[str, ...]) -> None:
    """Add the rows of ``x`` [..., K] to the running statistics in ``acc``."""
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    acc["count"] = acc.get("count", torch.zeros((), dtype=torch.float64)) + x.shape[0]
    if "sum_sq" in stats:
        acc["sum_sq"] = acc.get("sum_sq", 0) + (x * x).sum(0)
    if "abs_max" in stats:
        cur = x.abs().amax(0)
        acc["abs_max"] = torch.maximum(acc["abs_max"], cur) if "abs_max" in acc else cur
    if "abs_sum" in stats:
        acc["abs_sum"] = acc.get("abs_sum", 0) + x.abs().sum(0)
    if "gram" in stats:
        acc["gram"] = acc.get("gram", 0) + x.T @ x


def _block_index_by_node(graph) -> dict:
    out = {}
    for block in graph.sites("block"):
        for node in block.nodes:
            out[node] = block.index
    return out


def _fetch(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _materialise(gm, node, env, b):
    def value(n):
        return _fetch(gm, n.target) if n.op == "get_attr" else env[n][b]

    args = torch.fx.node.map_arg(node.args, value)
    kwargs = torch.fx.node.map_arg(node.kwargs, value)
    return args, kwargs


def _execute(gm, node, args, kwargs):
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    self_obj, *rest = args
    return getattr(self_obj, node.target)(*rest, **kwargs)
