"""Weight sparsity: ``Sparsify`` — magnitude, Wanda or SparseGPT masks, stored compressed.

Methods (scores are computed apart from the rewrite):
* ``magnitude``: prune the smallest ``|W|`` of each layer (Han et al. 2015; the baseline
  of the Wanda and SparseGPT papers, layer-wise as in the Wanda code).
* ``wanda``: score ``|W_ij| * ||X_j||_2`` over the calibration tokens and compare within
  each output row (Sun et al. 2024, "A Simple and Effective Pruning Approach for LLMs").
* ``sparsegpt``: OBS-style selection ``w^2 / [H^-1]_jj^2`` with adaptive mask blocks of 128
  columns, and the remaining weights updated through the inverse-Hessian Cholesky factor
  to compensate (Frantar & Alistarh 2023). Runs sequentially through the graph with
  ``run_lockstep``: each linear's Hessian ``X^T X`` comes from inputs that already went
  through the pruned layers before it.

Patterns: ``unstructured`` (any ``sparsity`` in (0, 1)), ``"2:4"`` and ``"4:8"`` (N kept of
every M consecutive inputs of a row; sparsity is 1 - N/M). A linear whose input size is not
divisible by M is skipped with the reason; so are linears outside the transformer blocks
(the papers prune block linears only; name them in ``targets=`` to include them) and
weights shared with another op (a tied embedding would be stored twice).

Storage: 2:4 weights become ``rarefy::linear_sparse24`` (kept values + 2-bit positions,
rarefy.kernels.sparse24: 0.53x of fp32, a Triton kernel multiplies without expanding);
other patterns ``rarefy::linear_masked`` (kept values + a 1-bit mask, 0.53x at 50%; no
sparse kernel, the reference expands to dense). ONNX Runtime has no sparse GEMM: the ONNX
artifact stores the compressed form and rebuilds the dense weight in the graph, so no
speedup is expected there. Composition: the sparse linears are no longer ``aten.linear``
sites, so a later ``QuantizeWeights`` leaves them sparse in fp32 (2:4 with 4-bit values
exists in the kernel but is not produced by this pass yet). FX dialect, fp32/fp16 weights.
"""
from __future__ import annotations

import logging

import torch

from ..ir.calibration import linear_input_stats, run_lockstep
from ..ir.errors import UnsupportedError
from ..ir.fx_utils import (add_tensor, drop_unused_attrs, get_attr_node, get_tensor, set_tensor,
                           shared_weights)
from . import args
from .base import Pass, PassResult

log = logging.getLogger(__name__)

PATTERNS = {"unstructured": None, "2:4": (2, 4), "4:8": (4, 8)}
METHODS = ("magnitude", "wanda", "sparsegpt")
SPARSEGPT_BLOCK = 128  # columns per adaptive mask block (the paper's Bs)
SPARSEGPT_DAMP = 0.01  # dampening, a fraction of the mean Hessian diagonal
NO_SPEEDUP = ("no speedup expected on onnxruntime (no sparse kernel: the compressed weight is expanded "
              "to dense inside the graph); {triton}")


# -- masks (compute) -----------------------------------------------------------------------------
def keep_lowest_pruned(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
                       per_row: bool) -> torch.Tensor:
    """Boolean keep-mask that prunes the lowest scores: per group of M (N:M), per row, or per layer."""
    rows, cols = scores.shape
    if nm is not None:
        n, m = nm
        groups = scores.reshape(rows, cols // m, m)
        drop = groups.topk(m - n, dim=-1, largest=False).indices
        return torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False).reshape(rows, cols)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if per_row:
        drop = scores.argsort(dim=1)[:, : int(cols * sparsity)]
        return keep.scatter_(1, drop, False)
    keep.view(-1)[scores.flatten().argsort()[: int(scores.numel() * sparsity)]] = False
    return keep


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm) -> torch.Tensor:
    return keep_lowest_pruned(weight.detach().abs().float(), sparsity, nm, per_row=False)


def wanda_mask(weight: torch.Tensor, sum_sq: torch.Tensor, sparsity: float, nm) -> torch.Tensor:
    # S_ij = |W_ij| * ||X_j||_2, compared within each output row i
    scores = weight.detach().abs().double() * sum_sq.double().sqrt()[None, :]
    return keep_lowest_pruned(scores, sparsity, nm, per_row=True)


def sparsegpt_prune(weight: torch.Tensor, gram: torch.Tensor, sparsity: float, nm,
                    block: int = SPARSEGPT_BLOCK, damp: float = SPARSEGPT_DAMP):
    """SparseGPT on ``weight [N, K]`` with Hessian ``gram = X^T X [K, K]``: (updated weight, keep)."""
    w = weight.detach().double().clone()
    cols = w.shape[1]
    h = gram.double().clone()
    dead = torch.diag(h) == 0  # inputs that are always 0: their weights do nothing
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    # upper Cholesky factor of H^-1: row i holds the OBS update of the columns after i
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        diag = torch.diag(hinv1)
        err1 = torch.zeros_like(w1)
        prune1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:  # adaptive mask selection: the OBS error w^2 / [H^-1]_jj^2 over this block
            prune1 = ~keep_lowest_pruned(w1 ** 2 / diag[None, :] ** 2, sparsity, None, per_row=False)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                scores = w1[:, i:i + nm[1]] ** 2 / diag[None, i:i + nm[1]] ** 2
                prune1[:, i:i + nm[1]] = ~keep_lowest_pruned(scores, sparsity, (nm[0], nm[1]), per_row=True)
            q = w1[:, i].masked_fill(prune1[:, i], 0)
            err = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]  # w <- w - (w_p / [H^-1]_pp) H^-1_p:
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        keep[:, i1:i2] = ~prune1
    return (w * keep).to(weight.dtype), keep


# -- rewrite (convert) -----------------------------------------------------------------------------
def _rewrite_fx(graph, site, weight: torch.Tensor, keep: torch.Tensor, nm) -> dict:
    """Replace the site's aten.linear by a compressed sparse linear; returns its storage facts."""
    from rarefy.kernels.bitmask import compress_masked
    from rarefy.kernels.sparse24 import compress_24

    gm = graph.fx
    node = site.nodes[0]
    n, k = weight.shape
    sparse = weight.detach() * keep
    hint = site.name or site.tensors["weight"]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if nm == (2, 4):
        values, indices = compress_24(sparse)
        stored = [values, indices]
        op, tail, fmt = torch.ops.rarefy.linear_sparse24.default, (bias, k), "2:4 values + 2-bit positions"
    else:
        values, mask = compress_masked(sparse, keep)
        stored = [values, mask]
        op, tail, fmt = torch.ops.rarefy.linear_masked.default, (bias, n, k), "values + 1-bit mask"
    names = [add_tensor(gm, f"{hint}.{role}", t) for role, t in zip(("values", "index"), stored)]
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(op, (node.args[0], *(get_attr_node(gm, node, t) for t in names), *tail))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    dense_bytes = weight.numel() * weight.element_size()
    stored_bytes = sum(t.numel() * t.element_size() for t in stored)
    return {"format": fmt, "sparsity": round(1 - float(keep.float().mean()), 6),
            "dense_bytes": dense_bytes, "stored_bytes": stored_bytes}


class Sparsify(Pass):
    """Prune linear weights to a sparsity pattern (magnitude / Wanda / SparseGPT), stored compressed."""

    def __init__(self, sparsity: float | None = 0.5, pattern: str = "unstructured", method: str = "wanda", *,
                 targets=None, ignore=None, budget=None):
        super().__init__(targets=targets, ignore=ignore, budget=budget)
        sparsity = args.number(self.name, "sparsity", sparsity, low=0, high=1, low_open=True, high_open=True,
                               optional=True)
        pattern = args.choice(self.name, "pattern", pattern, tuple(PATTERNS))
        if pattern not in PATTERNS:
            raise UnsupportedError(f"Sparsify: unknown pattern {pattern!r}; choose one of {list(PATTERNS)}")
        if method not in METHODS:
            raise UnsupportedError(f"Sparsify: unknown method {method!r}; choose one of {METHODS}")
        nm = PATTERNS[pattern]
        if nm is not None:
            implied = 1 - nm[0] / nm[1]
            if sparsity is not None and abs(sparsity - implied) > 1e-9:
                raise UnsupportedError(f"Sparsify: pattern {pattern} fixes sparsity at {implied}, got sparsity={sparsity}")
            sparsity = implied
        elif sparsity is None or not 0 < sparsity < 1:
            raise UnsupportedError(f"Sparsify: sparsity must be in (0, 1) for unstructured pruning, got {sparsity}")
        self.sparsity, self.pattern, self.method, self.nm = float(sparsity), pattern, method, nm
        self.needs_calibration = method != "magnitude"

    def plan(self, graph) -> tuple[list, dict[str, str]]:
        """(sites to prune, {skipped site: reason})."""
        sites = graph.sites("linear")
        in_blocks = {name for block in graph.sites("block") for name in block.info["linears"]}
        names, skipped = self.select([s.name for s in sites])
        shared = shared_weights(graph.fx)
        chosen = []
        for site in sites:
            if site.name not in names:
                continue
            k = site.info["in_features"]
            if not self.targets and site.name not in in_blocks:
                skipped[site.name] = "outside the transformer blocks (name it in targets= to prune it)"
            elif site.tensors["weight"] in shared:
                skipped[site.name] = "its weight is shared with another op (tied): pruning would store it twice"
            elif self.nm is not None and k % self.nm[1]:
                skipped[site.name] = f"input size {k} is not divisible by {self.nm[1]} ({self.pattern} needs whole groups)"
            else:
                chosen.append(site)
        return chosen, skipped

    def requires(self, graph, ctx) -> None:
        chosen, skipped = self.plan(graph)
        if not chosen:
            reasons = "; ".join(f"{n}: {why}" for n, why in list(skipped.items())[:4])
            raise UnsupportedError(f"no linear can be pruned to {self.pattern} ({reasons or 'no linear sites'})")

    def call(self, graph, ctx) -> PassResult:
        chosen, skipped = self.plan(graph)
        notes = [f"{name}: skipped ({why})" for name, why in skipped.items()]
        masks = self._masks(graph, chosen, ctx)
        details, stored, dense = {}, 0, 0
        for site in chosen:
            weight = get_tensor(graph.fx, site.tensors["weight"])
            details[site.name] = _rewrite_fx(graph, site, weight, masks[site.name], self.nm)
            stored += details[site.name]["stored_bytes"]
            dense += details[site.name]["dense_bytes"]
        drop_unused_attrs(graph.fx)
        triton = "2:4 kernel on triton (rarefy.kernels.sparse24)" if self.nm == (2, 4) else \
            "no sparse kernel on triton either (the bitmask format runs its torch reference)"
        notes.append(NO_SPEEDUP.format(triton=triton))
        notes.append(f"pruned weights stored in {stored} bytes instead of {dense} dense ({stored / max(dense, 1):.3f}x)")
        details["total"] = {"stored_bytes": stored, "dense_bytes": dense,
                            "sparsity": _mean_sparsity(details, chosen)}
        stats = {"sparse_linear": len(chosen), "skipped": len(skipped)}
        return PassResult(graph, bool(chosen), stats, notes, details)

    def _masks(self, graph, sites, ctx) -> dict[str, torch.Tensor]:
        gm = graph.fx
        if self.method == "magnitude":
            return {s.name: magnitude_mask(get_tensor(gm, s.tensors["weight"]), self.sparsity, self.nm) for s in sites}
        if self.method == "wanda":
            stats = linear_input_stats(graph, ctx.batches, sites, ("sum_sq",), progress=ctx.progress)
            return {s.name: wanda_mask(get_tensor(gm, s.tensors["weight"]), stats[s.name]["sum_sq"],
                                       self.sparsity, self.nm) for s in sites}
        return self._sparsegpt(graph, sites, ctx)

    def _sparsegpt(self, graph, sites, ctx) -> dict[str, torch.Tensor]:
        """Prune each linear as the lock-step run reaches it; later layers see the pruned outputs."""
        by_node = {s.nodes[0]: s for s in sites}
        masks: dict[str, torch.Tensor] = {}
        grams: dict = {}  # q/k/v (gate/up) read one input: its Hessian is computed once

        def hook(node, per_batch):
            site = by_node.get(node)
            if site is None:
                return
            source = node.args[0]
            if source not in grams:
                grams.clear()
                grams[source] = sum(_gram(args[0]) for args, _ in per_batch)
            weight = get_tensor(graph.fx, site.tensors["weight"])
            pruned, masks[site.name] = sparsegpt_prune(weight, grams[source], self.sparsity, self.nm)
            set_tensor(graph.fx, site.tensors["weight"], pruned.to(weight.dtype))  # the node runs pruned

        run_lockstep(graph, ctx.batches, hook, progress=ctx.progress, desc="SparseGPT", until=by_node)
        return masks


def _gram(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().reshape(-1, x.shape[-1]).float()
    return (x.T @ x).double()  # fp32 products, fp64 sum over batches


def _mean_sparsity(details: dict, sites) -> float:
    total = sum(details[s.name]["dense_bytes"] for s in sites)
    if not total:
        return 0.0
    return round(sum(details[s.name]["sparsity"] * details[s.name]["dense_bytes"] for s in sites) / total, 6)
