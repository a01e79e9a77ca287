"""GPTQ: ``QuantizeWeights(method="gptq")`` — Hessian-aware rounding, one block at a time.

Paper: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (ICLR 2023). For a linear ``W [N, K]`` with calibration
inputs ``X``, the layer loss ``||X W^T - X Q^T||^2`` has Hessian ``H = 2 X^T X / n``. Columns
are quantized one at a time, and each column's rounding error is spread over the columns not
yet quantized through the upper Cholesky factor of ``H^-1`` (the OBS update). As in the
reference implementation: dead inputs (``H_jj = 0``) are zeroed, ``H`` is damped by
``damp * mean(diag H)``, updates are applied lazily in blocks of ``BLOCK_COLUMNS`` columns,
and ``act_order`` visits columns by decreasing ``H_jj``; group scales stay per *contiguous*
group of the original column order (the "static groups" variant: computed on the weight
before any update, then the permutation is undone before packing).

Sequential, with bounded memory: ``run_lockstep`` runs the graph node by node for all
calibration batches; the hook at each chosen linear builds its Hessian from that node's
per-batch inputs (shared by linears that read the same input: q/k/v, gate/up), quantizes
the weight and writes the dequantized weight back, so later layers calibrate on the
quantized model's activations. Only the current node's activations are held. The
dequantized weight stands in for the original only while its node runs on the calibration
batches; then the original (shared with the caller's graph, so free) is put back and only
the codes are kept, as uint8: peak memory is the model, one node's activations per batch
and the packed result, not a second fp32 model.
The grid is RTN's (``group_scales`` / ``quantize_with``) with the clipping range of each group searched
(``_grid``), so GPTQ and RTN differ only in that search and in rounding.
Dialect: FX. Dtypes: fp32 / fp16 weights (GPTQ runs in fp32).
"""
from __future__ import annotations

import contextlib
import logging

import torch

from ..ir.calibration import run_lockstep
from ..ir.errors import UnsupportedError
from ..ir.fx_utils import get_tensor, set_tensor
from .quantize import WEIGHT_QUANTIZERS, block_size_for, quantize_with, search_clip

log = logging.getLogger(__name__)

BLOCK_COLUMNS = 128  # lazy-update width (the reference implementation's default)


def hessian(inputs: list[torch.Tensor]) -> torch.Tensor:
    """``H = 2 X^T X / n`` over the rows of every input ``[..., K]`` (fp64 sums, fp32 result)."""
    k = inputs[0].shape[-1]
    total = torch.zeros(k, k, dtype=torch.float64)
    count = 0
    for x in inputs:
        x = x.detach().reshape(-1, k).float()
        total += (x.T @ x).double()
        count += x.shape[0]
    return (2.0 * total / max(count, 1)).float()


class SharedHessians:
    """The input Hessian of each chosen linear during a lockstep calibration run: computed at
    the first linear that reads an input (q/k/v share one, gate/up share one) and dropped once
    the last of them has used it, so at most one layer's Hessians are held at a time."""

    def __init__(self, sites: list):
        self.sites = {site.nodes[0]: site for site in sites}  # linear node -> its site
        self._readers: dict = {}  # input node -> chosen linears that still have to read it
        for site in sites:
            self._readers[site.nodes[0].args[0]] = self._readers.get(site.nodes[0].args[0], 0) + 1
        self._hessians: dict = {}

    def of(self, node, per_batch) -> torch.Tensor:
        """``2 X^T X / n`` of ``node``'s input over the batches' recorded calls."""
        source = node.args[0]
        if source not in self._hessians:
            self._hessians[source] = hessian([args[0] for args, _ in per_batch])
        return self._hessians[source]

    def release(self, node) -> None:
        """``node`` is done with its input's Hessian."""
        source = node.args[0]
        self._readers[source] -= 1
        if self._readers[source] == 0:
            del self._hessians[source]


def gptq_quantize(weight: torch.Tensor, h: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                  damp: float = 0.01, act_order: bool = True, block_columns: int = BLOCK_COLUMNS):
    """GPTQ codes of ``weight [N, K]`` given its input Hessian ``h [K, K]``.

    Returns ``codes`` int64 [N, K], per-group ``scales`` fp32 and ``zeros`` int64 [N, n_groups]
    (groups of ``group_size`` contiguous columns, one group when None) and the dequantized
    weight [N, K].
    """
    with _one_thread():
        return _gptq(weight, h, bits, group_size, symmetric, damp, act_order, block_columns)


@contextlib.contextmanager
def _one_thread():
    """The column loop is thousands of small ops: threads only add sync cost (100x on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _gptq(weight, h, bits, group_size, symmetric, damp, act_order, block_columns):
    w = weight.detach().float().clone()
    n, k = w.shape
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    group = group_size or k
    n_groups = -(-k // group)
    # static groups: grid of each contiguous group from the (dead-zeroed) weight before updates;
    # needed with act_order (a group's columns are visited out of order), the reference's choice
    # for per-channel, and the dynamic alternative below otherwise
    static = act_order or group_size is None
    if static:
        scales, zeros = _grid(w, group, bits, symmetric)
    else:
        scales = torch.empty(n, n_groups)
        zeros = torch.empty(n, n_groups, dtype=torch.int64)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h, damp)
    codes = torch.empty(n, k, dtype=torch.int64)
    deq = torch.empty(n, k)
    width = max(block_columns, group)  # a power-of-two group never straddles a lazy block
    for i1 in range(0, k, width):
        i2 = min(i1 + width, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = int(perm[i1 + i])
            g = column // group
            if not static and column % group == 0:
                s, z = _grid(w1[:, i:i + group], group, bits, symmetric)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            c = quantize_with(w1[:, i:i + 1], scales[:, g], zeros[:, g], bits)[:, 0]
            q = (c - zeros[:, g]).float() * scales[:, g]
            codes[:, i1 + i], deq[:, i1 + i] = c, q
            err = (w1[:, i] - q) / hinv1[i, i]
            # OBS: the remaining columns of the block absorb this column's error
            w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # the lazy update of everything after the block
    inverse = torch.argsort(perm)
    return codes[:, inverse], scales, zeros, deq[:, inverse]


def _grid(w: torch.Tensor, group: int, bits: int, symmetric: bool):
    """Scales / zeros [N, n_groups] of the contiguous column groups of ``w [N, K]``.

    The clipping range is searched as in the reference implementation's ``mse`` option: the
    group's range shrunk by ``1 - i / 100`` for ``i < 20``, keeping per group the shrink with
    the smallest ``sum |w - q(w)|^2.4``."""
    n, k = w.shape
    n_groups = -(-k // group)
    padded = torch.nn.functional.pad(w, (0, n_groups * group - k)).reshape(n, n_groups, group)
    valid = (torch.arange(n_groups * group) < k).reshape(n_groups, group)
    return search_clip(padded, valid, bits, symmetric, [1 - i / 100 for i in range(20)],
                       lambda dw: (dw.abs().pow(2.4) * valid).sum(-1))


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)^-1``; λ grows tenfold until H is positive definite."""
    eye = torch.eye(h.shape[0])
    mean_diag = float(torch.diag(h).mean())
    for attempt in range(6):
        lam = damp * mean_diag * 10 ** attempt
        try:
            inv = torch.cholesky_inverse(torch.linalg.cholesky(h + lam * eye))
            return torch.linalg.cholesky(inv, upper=True)
        except torch.linalg.LinAlgError:
            log.info("GPTQ: Hessian not positive definite with damping %.3g; increasing it", lam)
    raise UnsupportedError("GPTQ: the Hessian stays singular even with 1e5 x damping (are the inputs all zero?)")


def to_blocks(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int | None):
    """Per-group codes [N, K] / params [N, n_groups] -> the packed-block layout of ``quantize_blocks``."""
    n, k = codes.shape
    block = block_size_for(group_size, k)
    group = group_size or block * -(-k // block)
    n_groups = -(-k // group)
    pad = n_groups * group - k
    if pad:  # padding codes equal the zero point: they dequantize to 0
        codes = torch.cat([codes, zeros[:, -1:].expand(n, pad)], 1)
    n_blocks = group // block
    return (codes.reshape(n, n_groups * n_blocks, block), scales.repeat_interleave(n_blocks, 1),
            zeros.repeat_interleave(n_blocks, 1))


def run_gptq(graph, sites: list, batches: list, bits: dict[str, int], group_size: int | None, symmetric: bool,
             damp: float = 0.01, act_order: bool = True, progress: bool = True) -> dict:
    """GPTQ every site (``bits[site.name]`` each), sequentially; {site name: (codes, scales, zeros)}."""
    if graph.dialect != "fx":
        raise UnsupportedError("method 'gptq' runs on FX-dialect graphs (capture the model with rf.capture)")
    gm = graph.fx
    hessians = SharedHessians(sites)
    originals: dict[torch.fx.Node, tuple[str, torch.Tensor]] = {}  # node -> its weight before GPTQ
    results: dict = {}

    def hook(node, per_batch):
        site = hessians.sites.get(node)
        if site is None:
            return
        path = site.tensors["weight"]
        weight = get_tensor(gm, path)
        codes, scales, zeros, deq = gptq_quantize(weight, hessians.of(node, per_batch), bits[site.name], group_size,
                                                  symmetric, damp, act_order)
        results[site.name] = to_blocks(codes.to(torch.uint8), scales, zeros, group_size)
        originals[node] = (path, weight)
        set_tensor(gm, path, deq.to(weight.dtype))  # this node's outputs, and so later layers, see it quantized
        hessians.release(node)

    def after(node):
        if node in originals:
            set_tensor(gm, *originals.pop(node))  # the dequantized copy is no longer needed

    try:
        run_lockstep(graph, batches, hook, progress=progress, desc="GPTQ", after=after, until=hessians.sites)
    finally:
        for path, weight in originals.values():
            set_tensor(gm, path, weight)
    return results


def _gptq_weights(p, graph, sites, ctx) -> dict:
    return run_gptq(graph, sites, ctx.batches, {s.name: p.bits for s in sites}, p.group_size, p.symmetric,
                    damp=p.damp, act_order=p.act_order, progress=ctx.progress)


WEIGHT_QUANTIZERS["gptq"] = _gptq_weights
