"""MixedPrecision: a bit width per linear from measured sensitivity, under an average-bit budget.

Follows the layer-wise bit-allocation line of work (Layer-Wise Quantization, Dumitru et al.
2024; BAQ; EvoPress, Sieberling et al. 2024): layers differ in how much quantization error
they tolerate, so spend bits where they buy the most. The sensitivity of linear ``l`` at ``b``
bits estimates the calibration-loss increase that quantizing it alone causes, to second order
with the empirical Fisher (Gauss-Newton) of the loss at the linear's output, as in
second-order allocation (HAWQ-V2, Dong et al. 2020) and Fisher-weighted quantization
(SqueezeLLM, Kim et al. 2024)::

    s_l(b) = sum_i g_i (dW H dW^T)_ii,   dW = W - RTN_b(W),   H = X^T X / n,
    g_i    = E (dL/dy_i)^2   (mean squared loss gradient at output channel i, over tokens)

``(dW H dW^T)_ii`` is the mean squared error of output channel ``i`` of the linear alone (its
inputs ``X`` from a lock-step calibration run); ``g_i`` says how much the loss cares about an
error there (one forward and backward pass per calibration batch). The gradient and the
input are treated as independent, so the Fisher ``E[(g^T dW x)^2]`` factors into the two.
The loss is the next-token NLL for a causal LM (first output: logits over the vocabulary),
otherwise the sum of ``<y, r>`` over the floating outputs ``y`` with fixed random sign
tensors ``r`` (then ``E g g^T = J J^T``: the squared change of the outputs).

Allocation is exact: a multiple-choice knapsack, solved by dynamic programming over the
parameter-weighted bit cost, minimises the summed sensitivity subject to
``sum_l params_l * bits_l <= avg_bits * sum_l params_l`` (parameters counted in units of their
gcd; coarsened only for huge unit counts); the achieved average must land within
``BUDGET_SLACK`` bits of ``avg_bits`` or the pass raises. The average counts code bits of
the quantized linears only: the group scales (and zero points) add
``(16 or 32 + bits) / group_size`` bits per weight on top, reported in the notes.
Then every linear is quantized at its width with RTN or GPTQ (``quantizer=``), on the grid
and in the packed layout of ``QuantizeWeights``. Each linear's choice and its sensitivity
numbers are in the details and notes. Dialect: FX.
"""
from __future__ import annotations

import functools
import math

import torch
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from ..eval.metrics import is_lm_logits, next_token_nll
from ..ir.calibration import run_lockstep
from ..ir.errors import PassError, UnsupportedError
from ..ir.fx_utils import drop_unused_attrs, get_tensor
from ..ir.signature import split_inputs
from . import args
from .base import Pass, PassResult
from .gptq import SharedHessians, run_gptq
from .quantize import WEIGHT_BITS, QuantizeWeights, _rewrite_fx, dequantize_blocks, quantize_blocks

BUDGET_SLACK = 0.05  # bits: the allowed distance between the achieved and the requested average
MAX_UNITS = 1_000_000  # knapsack capacity cells before parameter counts are coarsened


class MixedPrecision(Pass):
    """Per-linear bit widths from calibration sensitivity, hitting an average-bit budget."""

    needs_calibration = True
    dialects = ("fx",)

    def __init__(self, avg_bits: float, candidates=(2, 3, 4, 8), group_size: int | None = 64,
                 method: str = "sensitivity", symmetric: bool = True, quantizer: str = "rtn", *,
                 damp: float = 0.01, act_order: bool = True, targets=None, ignore=None, budget=None):
        super().__init__(targets=targets, ignore=ignore, budget=budget)
        avg_bits = args.number(self.name, "avg_bits", avg_bits)
        candidates = tuple(sorted(set(args.integers(self.name, "candidates", candidates))))
        group_size = args.integer(self.name, "group_size", group_size, optional=True)
        args.flag(self.name, "symmetric", symmetric)
        args.flag(self.name, "act_order", act_order)
        damp = args.number(self.name, "damp", damp, low=0, high=1, low_open=True, high_open=True)
        if not candidates or any(b not in WEIGHT_BITS for b in candidates):
            raise UnsupportedError(f"MixedPrecision: candidates={candidates} must be a non-empty subset of {WEIGHT_BITS}")
        if not candidates[0] <= avg_bits <= candidates[-1]:
            raise UnsupportedError(
                f"MixedPrecision: avg_bits={avg_bits} is outside the candidates' range {candidates[0]}..{candidates[-1]}")
        if method != "sensitivity":
            raise UnsupportedError(f"MixedPrecision: unknown method {method!r}; choose 'sensitivity'")
        if quantizer not in ("rtn", "gptq"):
            raise UnsupportedError(f"MixedPrecision: quantizer={quantizer!r} must be 'rtn' or 'gptq'")
        # one QuantizeWeights per width validates group_size / damp and does the rewrite
        self.widths = {b: QuantizeWeights(bits=b, group_size=group_size, symmetric=symmetric, damp=damp,
                                          act_order=act_order, targets=targets, ignore=ignore) for b in candidates}
        self.avg_bits, self.candidates, self.group_size, self.symmetric = avg_bits, candidates, group_size, symmetric
        self.quantizer, self.damp, self.act_order = quantizer, damp, act_order

    def requires(self, graph, ctx) -> None:
        self.widths[self.candidates[0]].requires(graph, ctx)  # linear sites exist, group fits every K

    def call(self, graph, ctx) -> PassResult:
        chosen, skipped = self.widths[self.candidates[0]]._chosen_sites(graph)
        notes = [f"{name}: skipped ({why})" for name, why in skipped.items()]
        sensitivity = measure_sensitivity(graph, chosen, ctx.batches, self.candidates, self.group_size,
                                          self.symmetric, progress=ctx.progress)
        params = {s.name: s.info["in_features"] * s.info["out_features"] for s in chosen}
        bits = allocate_bits(params, sensitivity, self.avg_bits)
        achieved = sum(params[n] * b for n, b in bits.items()) / sum(params.values())
        if abs(achieved - self.avg_bits) > BUDGET_SLACK:
            raise PassError(f"MixedPrecision: the allocation reached {achieved:.3f} average bits, more than "
                            f"{BUDGET_SLACK} from avg_bits={self.avg_bits} (candidates {self.candidates})")
        if self.quantizer == "gptq":
            weights = run_gptq(graph, chosen, ctx.batches, bits, self.group_size, self.symmetric,
                               damp=self.damp, act_order=self.act_order, progress=ctx.progress)
        else:
            weights = {s.name: None for s in chosen}
        stats = {"quantized_linear": 0, **{f"bits_{b}": 0 for b in self.candidates}}
        details = {}
        for site in chosen:
            b = bits[site.name]
            _rewrite_fx(graph, site, self.widths[b], weights[site.name])
            stats["quantized_linear"] += 1
            stats[f"bits_{b}"] += 1
            details[site.name] = {"bits": b, "params": params[site.name],
                                  "sensitivity": {str(c): v for c, v in sensitivity[site.name].items()}}
            others = ", ".join(f"{c}b {v:.3g}" for c, v in sensitivity[site.name].items())
            notes.append(f"{site.name}: {b} bits (Fisher-weighted output error at {others})")
        drop_unused_attrs(graph.fx)
        group = self.group_size or max(s.info["in_features"] for s in chosen)
        overhead = (16 + (0 if self.symmetric else 4)) / group  # fp16-equivalent scale (+ zero point) per group
        notes.append(f"average {achieved:.3f} code bits per quantized weight over {sum(params.values())} parameters "
                     f"(budget {self.avg_bits}); scales and zero points add about {overhead:.2f} bits more "
                     f"(fp32 scales: twice the scale part)")
        stats["skipped"] = len(skipped)
        return PassResult(graph, stats["quantized_linear"] > 0, stats, notes, details)


def measure_sensitivity(graph, sites: list, batches: list, candidates, group_size, symmetric,
                        progress: bool = True) -> dict[str, dict[int, float]]:
    """{site name: {bits: sum_i g_i (dW H dW^T)_ii}} (see the module docstring)."""
    gm = graph.fx
    gradient = output_gradient_energy(graph, sites, batches, progress)
    hessians, result = SharedHessians(sites), {}

    def hook(node, per_batch):
        site = hessians.sites.get(node)
        if site is None:
            return
        h = hessians.of(node, per_batch) / 2  # X^T X / n
        w = get_tensor(gm, site.tensors["weight"]).detach().float()
        result[site.name] = {}
        for b in candidates:
            dw = w - dequantize_blocks(*quantize_blocks(w, b, group_size, symmetric), w.shape[1])
            result[site.name][b] = float(((dw @ h) * dw).sum(1).double() @ gradient[site.name])
        hessians.release(node)

    run_lockstep(graph, batches, hook, progress=progress, desc="MixedPrecision sensitivity", until=hessians.sites)
    return result


def output_gradient_energy(graph, sites: list, batches: list, progress: bool = True) -> dict[str, torch.Tensor]:
    """{site name: E (dL/dy_i)^2 per output channel [N], fp64} at each linear's output ``y``
    over the calibration tokens, from one forward and backward pass per batch (weights get
    no gradients); zeros for a linear no output depends on."""
    names = {site.nodes[0]: site.name for site in sites}
    sums = {site.name: torch.zeros(site.info["out_features"], dtype=torch.float64) for site in sites}
    counts = dict.fromkeys(names.values(), 0)
    vocab = (graph.meta.get("config") or {}).get("vocab_size")
    signs = torch.Generator().manual_seed(0)

    def add(name, grad):
        grad = grad.detach().reshape(-1, grad.shape[-1]).double()
        sums[name] += grad.pow(2).sum(0)
        counts[name] += grad.shape[0]

    for batch in tqdm(batches, desc="MixedPrecision loss gradients", disable=not progress, leave=False):
        args, kwargs = split_inputs(batch)
        with torch.enable_grad():
            outputs = _GradientTap(graph.fx, names, add).run(*graph.batch_leaves(batch))
            outputs = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
            ids = kwargs.get("input_ids")
            if is_lm_logits(ids, outputs, vocab):
                loss = next_token_nll(outputs[0], ids, kwargs.get("attention_mask")).mean()
            else:
                loss = sum((y * (torch.randint(0, 2, y.shape, generator=signs) * 2 - 1).to(y.dtype)).sum()
                           for y in outputs if y.is_floating_point() and y.requires_grad)
            loss.backward()
    return {name: sums[name] / max(counts[name], 1) for name in sums}


class _GradientTap(torch.fx.Interpreter):
    """Runs the graph with gradients flowing through activations only (values computed from
    the inputs, never from weights alone), and hooks the loss gradient at the chosen nodes'
    outputs."""

    def __init__(self, gm, names: dict, add):
        super().__init__(gm, garbage_collect_values=True)
        self.names, self.add = names, add
        self.activations: set = set()  # nodes whose value depends on a graph input

    def run_node(self, n):
        out = super().run_node(n)
        if n.op == "placeholder" or any(a in self.activations for a in n.all_input_nodes):
            self.activations.add(n)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return out
        if n not in self.activations:
            return out.detach()  # weights and what is computed from them alone get no gradients
        if not out.requires_grad:  # the first activations (the embedding lookup): leaves
            out = out.detach().requires_grad_()
        if n in self.names:  # the hook must not reference the interpreter: a cycle through a tensor leaks
            out.register_hook(functools.partial(self.add, self.names[n]))
        return out


def allocate_bits(params: dict[str, int], sensitivity: dict[str, dict[int, float]], avg_bits: float) -> dict[str, int]:
    """Exact multiple-choice knapsack: min sum of sensitivities s.t. sum params*bits <= avg_bits*sum params."""
    names = list(params)
    unit = functools.reduce(math.gcd, params.values())
    widest = max(max(sensitivity[n]) for n in names)
    total_units = sum(params.values()) // unit
    if total_units * widest > MAX_UNITS:  # coarsen: the DP stays small, the budget check below stays exact
        unit *= math.ceil(total_units * widest / MAX_UNITS)
    weight = {n: max(1, round(params[n] / unit)) for n in names}
    capacity = math.floor(avg_bits * sum(weight.values()) + 1e-9)
    inf = float("inf")
    best = torch.full((capacity + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for n in names:
        new = torch.full_like(best, inf)
        pick = torch.zeros(capacity + 1, dtype=torch.int8)
        for b, s in sorted(sensitivity[n].items()):
            cost = weight[n] * b
            if cost > capacity:
                continue
            candidate = best[:capacity + 1 - cost] + s
            better = candidate < new[cost:]
            new[cost:] = torch.where(better, candidate, new[cost:])
            pick[cost:] = torch.where(better, torch.tensor(b, dtype=torch.int8), pick[cost:])
        best = new
        choices.append(pick)
    if not torch.isfinite(best).any():
        raise PassError(f"MixedPrecision: no allocation fits avg_bits={avg_bits}")
    spent = int(torch.argmin(best))
    bits = {}
    for n, pick in zip(reversed(names), reversed(choices)):
        bits[n] = int(pick[spent])
        spent -= weight[n] * bits[n]
    return {n: bits[n] for n in names}
