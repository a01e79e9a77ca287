"""ONNX lowering of the token ops (``rarefy/ir/ops.py``, PruneTokens / MergeTokens).

``rarefy::gather_tokens`` is translated by hand to one ``GatherElements`` over the token axis
(index broadcast over channels). The other token ops have branch-free torch references in
``rarefy/kernels/token_select.py`` that are traced at export into standard ONNX operators:
``TopK`` (token ranking and the ascending re-sort of the kept indices), ``GatherElements``
(masks, ToMe partners), ``ScatterElements`` (restoring pruned positions, ToMe's size-weighted
merge), ``Softmax``/``MatMul`` (the recomputed attention scores, EViT's fused token). One source of truth: torch,
ONNX Runtime and the Triton fallback run the same math.
"""
from __future__ import annotations

import torch

from ..kernels import token_select
from .onnx_lowering import onnx_decomposition, onnx_translation


@onnx_translation(torch.ops.rarefy.gather_tokens.default)
def _gather_tokens(hidden, index):
    from onnxscript import opset18 as op

    # out[b, j, :] = hidden[b, index[b, j], :]
    index3 = op.Unsqueeze(index, op.Constant(value_ints=[2]))
    shape = op.Concat(op.Shape(index), op.Shape(hidden, start=2), axis=0)
    return op.GatherElements(hidden, op.Expand(index3, shape), axis=1)


onnx_decomposition(torch.ops.rarefy.token_scores.default, token_select.attention_received)
onnx_decomposition(torch.ops.rarefy.select_tokens.default, token_select.select_tokens)
onnx_decomposition(torch.ops.rarefy.gather_mask.default, token_select.gather_mask)
onnx_decomposition(torch.ops.rarefy.scatter_tokens.default, token_select.scatter_tokens)
onnx_decomposition(torch.ops.rarefy.merge_tokens.default, token_select.merge_tokens)
onnx_decomposition(torch.ops.rarefy.fuse_pruned.default, token_select.fuse_pruned)
onnx_decomposition(torch.ops.rarefy.fused_mask.default, token_select.fused_mask)
onnx_decomposition(torch.ops.rarefy.scatter_fused.default, token_select.scatter_fused)
