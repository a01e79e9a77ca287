"""Activation quantization: ``QuantizeActivations`` — W8A8 linears (dynamic int8 activations).

Method: each selected linear becomes ``rarefy::linear_w8a8``: the weight is quantized once,
symmetric int8 per output channel (``w_scale[n] = max|W[n, :]| / 127``); at run time each
token's activation row is quantized to symmetric int8 with its own scale
(``x_scale[m] = max|x[m, :]| / 127``), the product is accumulated exactly in int32 and
rescaled, ``y = (x_q @ w_q.T) * x_scale * w_scale + bias``. This is the W8A8 scheme of
SmoothQuant (Xiao et al. 2023, "per-token + per-channel", their O1-style dynamic
variant) and LLM.int8()'s vector-wise quantization without its fp16 outlier split. Run
``SmoothQuant`` first to move activation outliers into the weights.

``granularity="tensor"`` instead quantizes the whole activation with one asymmetric uint8
scale and zero point (ONNX ``DynamicQuantizeLinear``; ``rarefy::linear_w8a8_tensor``), which
ONNX Runtime runs as its own ``quantize_dynamic`` graphs run: one quantization shared by the
linears reading a tensor, ``DynamicQuantizeMatMul`` where a linear reads it alone -- at some
accuracy cost on activations with outliers (run ``SmoothQuant`` and ``SplitOutliers`` first;
``benchmarks/quantize_minilm.py`` measures each).

Nothing is calibrated: the scales of activations are computed on the fly, so no
calibration data is needed. Lowering: the Triton backend runs
``rarefy.kernels.int8_gemm.w8a8_linear``; ONNX Runtime runs per-token quantization plus
``MatMulIntegerToFloat`` (see ``rarefy/ir/onnx_quant.py``). ONNX-dialect graphs are rewritten
in place to the same operators. The artifact stores int8 weights (1 byte each, plus one
fp32 scale per channel), not fp32 weights with a fake-quant pattern.
Dialects: FX and ONNX. Dtypes: fp32 / fp16 / bf16 activations, fp32 accumulation.
"""
from __future__ import annotations

import torch

from ..ir.errors import UnsupportedError
from ..ir.fx_utils import add_tensor, drop_unused_attrs, get_attr_node, get_tensor
from . import args
from .base import Pass, PassResult
from .quantize import quantizable_sites

ACTIVATION_BITS = (8,)
GRANULARITIES = ("token", "tensor")


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: ``(w_q int8 [N, K], w_scale fp32 [N])``."""
    from rarefy.kernels.int8_gemm import quantize_per_token_reference

    # a weight row is quantized exactly as an activation row is: one absmax scale per row
    return quantize_per_token_reference(weight.detach().float())


class QuantizeActivations(Pass):
    """W8A8: dynamic int8 activations (per token, or per tensor) times per-channel int8 weights, for linears."""

    dialects = ("fx", "onnx")

    def __init__(self, bits: int = 8, granularity: str = "token", *, targets=None, ignore=None, budget=None):
        """``granularity``: one activation scale per token (``"token"``) or per tensor (``"tensor"``)."""
        super().__init__(targets=targets, ignore=ignore, budget=budget)
        bits = args.integer(self.name, "bits", bits)
        if granularity not in GRANULARITIES:
            raise UnsupportedError(f"QuantizeActivations: granularity={granularity!r}; choose one of {GRANULARITIES}")
        self.granularity = granularity
        if bits not in ACTIVATION_BITS:
            raise UnsupportedError(
                f"QuantizeActivations: bits={bits} is not supported; choose one of {ACTIVATION_BITS} "
                f"(int8 x int8 -> int32 is what ONNX Runtime and the Triton kernel run)"
            )
        self.bits = bits

    def _chosen_sites(self, graph):
        return quantizable_sites(self, graph)

    def requires(self, graph, ctx) -> None:
        if not self._chosen_sites(graph)[0]:
            raise UnsupportedError("no linear sites match targets= / ignore= in this graph")

    def call(self, graph, ctx) -> PassResult:
        chosen, skipped = self._chosen_sites(graph)
        notes = [f"{name}: skipped ({why})" for name, why in skipped.items()]
        details = {}
        rewrite = _rewrite_fx if graph.dialect == "fx" else _rewrite_onnx
        for site in chosen:
            details[site.name] = rewrite(graph, site, self.granularity)
        if graph.dialect == "fx":
            drop_unused_attrs(graph.fx)
        stats = {"w8a8_linear": len(chosen), "skipped": len(skipped)}
        return PassResult(graph, bool(chosen), stats, notes, details)


def _weight_error(weight: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> dict:
    restored = w_q.float() * w_scale[:, None]
    weight = weight.detach()
    err = (weight.float() - restored).pow(2).sum() / weight.float().pow(2).sum().clamp_min(1e-30)
    return {"weight_sqnr_db": round(float(-10 * torch.log10(err.clamp_min(1e-30))), 2)}


def _rewrite_fx(graph, site, granularity: str) -> dict:
    gm = graph.fx
    node = site.nodes[0]
    weight = get_tensor(gm, site.tensors["weight"])
    w_q, w_scale = quantize_weight_per_channel(weight)
    hint = site.name or site.tensors["weight"]
    q_name = add_tensor(gm, f"{hint}.w_int8", w_q)
    s_name = add_tensor(gm, f"{hint}.w_scale", w_scale)
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    with gm.graph.inserting_before(node):
        op = torch.ops.rarefy.linear_w8a8 if granularity == "token" else torch.ops.rarefy.linear_w8a8_tensor
        new = gm.graph.call_function(op.default, (
            node.args[0], get_attr_node(gm, node, q_name), get_attr_node(gm, node, s_name), bias,
        ))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return _weight_error(weight, w_q, w_scale)


def _rewrite_onnx(graph, site, granularity: str) -> dict:
    from ..ir.onnx_sites import replace_with_w8a8

    weight = site.info["weight_value"]()
    w_q, w_scale = quantize_weight_per_channel(weight)
    replace_with_w8a8(graph, site, w_q, w_scale, granularity)
    return _weight_error(weight, w_q, w_scale)
