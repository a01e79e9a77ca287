"""Weight quantization: ``QuantizeWeights`` — group-wise integer weights, packed.

Method: each linear weight ``W [N, K]`` is split along K into blocks of ``group_size``
(or one block spanning K: per output channel) and mapped to ``bits``-bit integer codes,
``W ≈ (code - zero) * scale``. Symmetric: zero ``2**(bits-1)`` and
``scale = -w_ext / 2**(bits-1)`` with ``w_ext`` the block's value of largest magnitude, so it
lands exactly on code 0 and the other side keeps ``2**(bits-1) - 1`` levels: all ``2**bits``
codes are used (the scale may be negative; ONNX Runtime's blockwise quantizer and llama.cpp's
Q4_0 use the same grid, which beats ``max|W| / (2**(bits-1) - 1)``); asymmetric: ``scale = (max - min) / (2**bits - 1)`` over a range that
includes 0, ``zero = round(-min / scale)``. ``method="rtn"`` rounds to nearest
(the baseline of every PTQ paper, e.g. GPTQ, Frantar et al. 2023, Table 1).

The rewrite replaces ``aten.linear`` (FX) or ``MatMul`` [+ bias ``Add``] (ONNX) with the
weight-only quantized linear ``rarefy::matmul_nbits`` / ``com.microsoft::MatMulNBits``,
whose packed layout (ONNX Runtime's) is defined in ``rarefy/ir/ops.py``: the artifact
stores packed codes, not fp32 weights with a fake-quant pattern. ``group_size`` is a power
of two in 16..256 (ONNX Runtime's constraint); K need not be a multiple of it (the last block is
ragged, e.g. SmolLM2's 576 with group 128). Per-channel quantization computes one scale
per row and repeats it over 256-wide blocks. Dialects: FX and ONNX. Dtypes: fp32 / fp16 weights.
"""
from __future__ import annotations

import math

import torch

from ..ir.errors import UnsupportedError
from ..ir.fx_utils import add_tensor, drop_unused_attrs, get_attr_node, get_tensor
from ..ir.sites import KEEP_PRECISION
from . import args
from .base import Pass, PassResult

WEIGHT_BITS = (2, 3, 4, 8)


MAX_BLOCK = 256  # ONNX Runtime's CPU MatMulNBits takes blocks of 16..256


def quantizable_sites(p: Pass, graph) -> tuple[list, dict[str, str]]:
    """The linear sites a quantization pass ``p`` rewrites, and {skipped name: reason}: its
    ``targets`` / ``ignore`` selection, less the linears a pass marked to keep in full precision."""
    sites = graph.sites("linear")
    names, skipped = p.select([s.name for s in sites])
    kept = {s.name for s in sites if s.info.get(KEEP_PRECISION)}
    skipped.update({n: "kept in full precision by SplitOutliers" for n in kept})
    chosen = set(names) - kept
    return [s for s in sites if s.name in chosen], skipped


def block_size_for(group_size: int | None, in_features: int) -> int:
    """The packed block: the group, or (per channel) a power of two <= 256 covering K."""
    if group_size is not None:
        return group_size
    return min(MAX_BLOCK, max(16, 1 << math.ceil(math.log2(in_features))))


def quantize_blocks(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool):
    """Round-to-nearest codes for ``weight [N, K]`` in groups of ``group_size`` (None: per row).

    Returns ``codes`` int64 [N, n_blocks, block] (padding codes equal the zero point, so they
    dequantize to 0), ``scales`` fp32 [N, n_blocks] and ``zeros`` int64 [N, n_blocks], where
    ``block = block_size_for(group_size, K)``; a per-row scale is repeated over its blocks.
    """
    n, k = weight.shape
    block = block_size_for(group_size, k)
    group = group_size or block * -(-k // block)
    n_groups = -(-k // group)
    w = torch.nn.functional.pad(weight.detach().float(), (0, n_groups * group - k)).reshape(n, n_groups, group)
    valid = (torch.arange(n_groups * group) < k).reshape(n_groups, group)
    scales, zeros = group_scales(w, valid, bits, symmetric)
    codes = quantize_with(w, scales, zeros, bits)
    codes = torch.where(valid, codes, zeros.unsqueeze(-1))
    n_blocks = group // block
    return (codes.reshape(n, n_groups * n_blocks, block), scales.repeat_interleave(n_blocks, 1),
            zeros.repeat_interleave(n_blocks, 1))


def group_scales(w: torch.Tensor, valid: torch.Tensor, bits: int, symmetric: bool):
    """Scales and integer zero points of groups ``w [..., G]`` (``valid`` masks padding)."""
    qmax = (1 << bits) - 1
    if symmetric:  # the signed extreme maps to code 0 (-2**(bits-1)): all 2**bits levels are used
        extreme = w.gather(-1, w.abs().argmax(-1, keepdim=True)).squeeze(-1)
        scales = extreme / -(1 << (bits - 1))
        zeros = torch.full_like(scales, 1 << (bits - 1), dtype=torch.int64)
    else:
        big = torch.finfo(torch.float32).max
        lo = torch.where(valid, w, big).amin(-1).clamp(max=0)
        hi = torch.where(valid, w, -big).amax(-1).clamp(min=0)
        scales = (hi - lo) / qmax
        zeros = torch.round(-lo / torch.where(scales > 0, scales, 1)).clamp(0, qmax).to(torch.int64)
    return torch.where(scales != 0, scales, torch.ones_like(scales)), zeros


def quantize_with(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w [..., G]`` on the grid given by per-group ``scales`` / ``zeros``."""
    codes = torch.round(w / scales.unsqueeze(-1)).to(torch.int64) + zeros.unsqueeze(-1)
    return codes.clamp(0, (1 << bits) - 1)


def search_clip(w: torch.Tensor, valid: torch.Tensor, bits: int, symmetric: bool, shrinks, error):
    """Per-group scales / zeros of ``w [..., G]`` from the range shrunk by the factor in
    ``shrinks`` (the first 1.0: no clipping) whose rounding error ``error(w - q) [...]`` is
    smallest, per group. GPTQ's and AWQ's clipping searches differ only in the factors and
    the error."""
    best = None
    for shrink in shrinks:
        scales, zeros = group_scales(w * shrink, valid, bits, symmetric)
        q = (quantize_with(w, scales, zeros, bits) - zeros.unsqueeze(-1)).float() * scales.unsqueeze(-1)
        candidate = (error(w - q), scales, zeros)
        if best is None:
            best = candidate
            continue
        better = candidate[0] < best[0]
        best = tuple(torch.where(better, new, old) for new, old in zip(candidate, best))
    return best[1], best[2]


def dequantize_blocks(codes, scales, zeros, in_features: int) -> torch.Tensor:
    w = (codes - zeros.unsqueeze(-1)).float() * scales.unsqueeze(-1)
    return w.reshape(codes.shape[0], -1)[:, :in_features]


def pack_linear(codes, scales, zeros, bits: int, symmetric: bool, dtype: torch.dtype) -> dict:
    """Pack codes into the MatMulNBits tensors (qweight, scales, zero_points or None)."""
    from rarefy.kernels.matmul_nbits import pack_bits

    return {
        "qweight": pack_bits(codes, bits),
        "scales": scales.to(dtype),
        "zero_points": None if symmetric else pack_bits(zeros, bits),
    }


class QuantizeWeights(Pass):
    """Weight-only integer quantization of linear layers, stored packed (MatMulNBits layout)."""

    dialects = ("fx", "onnx")
    must_run_before = ()

    def __init__(self, bits: int = 8, group_size: int | None = None, symmetric: bool = True,
                 method: str = "rtn", *, damp: float = 0.01, act_order: bool = True,
                 targets=None, ignore=None, budget=None):
        """``damp`` (Hessian damping, a fraction of its mean diagonal) and ``act_order`` (visit
        columns by decreasing Hessian diagonal) apply to ``method="gptq"`` only."""
        super().__init__(targets=targets, ignore=ignore, budget=budget)
        bits = args.integer(self.name, "bits", bits)
        group_size = args.integer(self.name, "group_size", group_size, optional=True)
        args.flag(self.name, "symmetric", symmetric)
        args.flag(self.name, "act_order", act_order)
        damp = args.number(self.name, "damp", damp, low=0, high=1, low_open=True, high_open=True)
        if bits not in WEIGHT_BITS:
            raise UnsupportedError(f"QuantizeWeights: bits={bits} is not supported; choose one of {WEIGHT_BITS}")
        if group_size is not None and (group_size < 16 or group_size > MAX_BLOCK or group_size & (group_size - 1)):
            raise UnsupportedError(
                f"QuantizeWeights: group_size={group_size} must be a power of two from 16 to {MAX_BLOCK} "
                f"(or None for per-channel)"
            )
        if method not in self.methods():
            raise UnsupportedError(f"QuantizeWeights: unknown method {method!r}; choose one of {self.methods()}")
        self.bits, self.group_size, self.symmetric, self.method = bits, group_size, symmetric, method
        self.damp, self.act_order = damp, act_order
        self.needs_calibration = method != "rtn"

    @staticmethod
    def methods() -> tuple[str, ...]:
        return ("rtn",) + tuple(WEIGHT_QUANTIZERS)

    def requires(self, graph, ctx) -> None:
        chosen = self._chosen_sites(graph)[0]
        if not chosen:
            raise UnsupportedError("no linear sites match targets= / ignore= in this graph")
        for site in chosen:
            k = site.info["in_features"]
            if self.group_size is not None and self.group_size > k:
                raise UnsupportedError(
                    f"group_size={self.group_size} is larger than the input dimension {k} of {site.name}"
                )

    def _chosen_sites(self, graph):
        return quantizable_sites(self, graph)

    def call(self, graph, ctx) -> PassResult:
        chosen, skipped = self._chosen_sites(graph)
        notes = [f"{name}: skipped ({why})" for name, why in skipped.items()]
        if self.method == "rtn":
            weights = {s.name: None for s in chosen}
        else:
            weights = WEIGHT_QUANTIZERS[self.method](self, graph, chosen, ctx)
            notes += getattr(weights, "notes", [])  # how a calibrated method chose, e.g. AWQ's folds
        rewrite = _rewrite_fx if graph.dialect == "fx" else _rewrite_onnx
        stats = {"quantized_linear": 0}
        for site in chosen:
            rewrite(graph, site, self, weights.get(site.name))
            stats["quantized_linear"] += 1
        if graph.dialect == "fx":
            drop_unused_attrs(graph.fx)
        stats["skipped"] = len(skipped)
        return PassResult(graph, stats["quantized_linear"] > 0, stats, notes, dict(getattr(weights, "details", {})))

    def quantize(self, weight: torch.Tensor):
        return quantize_blocks(weight, self.bits, self.group_size, self.symmetric)


# Calibrated methods (GPTQ, AWQ) register here: fn(pass, graph, sites, ctx) -> {site name:
# (codes, scales, zeros[, new weight state])}; they live in their own modules.
WEIGHT_QUANTIZERS: dict = {}


def _rewrite_fx(graph, site, p: QuantizeWeights, precomputed) -> None:
    gm = graph.fx
    node = site.nodes[0]
    weight = get_tensor(gm, site.tensors["weight"])
    codes, scales, zeros = precomputed if precomputed is not None else p.quantize(weight)
    block = codes.shape[-1]
    packed = pack_linear(codes, scales, zeros, p.bits, p.symmetric, weight.dtype)
    hint = site.name or site.tensors["weight"]
    targets = {key: (add_tensor(gm, f"{hint}.{key}", t) if t is not None else None) for key, t in packed.items()}
    bias = node.args[2] if len(node.args) > 2 else None
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(torch.ops.rarefy.matmul_nbits.default, (
            node.args[0], get_attr_node(gm, node, targets["qweight"]), get_attr_node(gm, node, targets["scales"]),
            get_attr_node(gm, node, targets["zero_points"]), bias,
            weight.shape[1], weight.shape[0], p.bits, block,
        ))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    _tie_embeddings(gm, weight, targets, p.bits, block)


def _tie_embeddings(gm, weight: torch.Tensor, targets: dict, bits: int, block: int) -> int:
    """Embedding lookups of the tensor a linear just quantized (a tied LM head) read the same
    packed codes: ``rarefy::embedding_nbits`` over the linear's qweight / scales / zero points,
    so the table is stored once and the fp32 copy goes. Returns the lookups rewritten."""
    tied = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.embedding.default:
            continue
        table = node.args[0]
        if table.op != "get_attr" or get_tensor(gm, table.target) is not weight:
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.rarefy.embedding_nbits.default, (
                node.args[1], get_attr_node(gm, node, targets["qweight"]), get_attr_node(gm, node, targets["scales"]),
                get_attr_node(gm, node, targets["zero_points"]), weight.shape[1], weight.shape[0], bits, block))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        tied += 1
    return tied


def _rewrite_onnx(graph, site, p: QuantizeWeights, precomputed) -> None:
    from ..ir.onnx_sites import replace_with_matmul_nbits

    weight = site.info["weight_value"]()
    codes, scales, zeros = precomputed if precomputed is not None else p.quantize(weight)
    packed = pack_linear(codes, scales, zeros, p.bits, p.symmetric, torch.float32)
    replace_with_matmul_nbits(graph, site, packed, bits=p.bits, block_size=codes.shape[-1])
