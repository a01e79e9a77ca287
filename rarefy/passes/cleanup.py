"""Cleanup passes: exact rewrites that remove what computes nothing.

``EliminateDeadCode``: nodes whose results are never used, identity ops (inference-mode
dropout, ``alias``, ``Identity``) and the tensors no node reads any more. Exact: the
verifier holds it to 1e-5 max abs error in fp32. FX (torch.fx's dead-code elimination,
which keeps impure nodes) and ONNX (onnx-ir's ``IdentityEliminationPass`` and
``RemoveUnusedNodesPass``).
"""
from __future__ import annotations

import torch

from ..ir.fx_utils import drop_unused_attrs
from .base import Pass, PassResult

_IDENTITY_OPS = {torch.ops.aten.alias.default}


def _is_identity(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in _IDENTITY_OPS:
        return True
    if node.target is torch.ops.aten.dropout.default:  # dropout(x, p, train)
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return not train or p == 0
    return False


class EliminateDeadCode(Pass):
    """Remove unused nodes, identity ops and unread tensors."""

    exact = True
    dialects = ("fx", "onnx")

    def __init__(self, *, targets=None, ignore=None, budget=None):
        super().__init__(targets=targets, ignore=ignore, budget=budget)

    def call(self, graph, ctx) -> PassResult:
        if graph.dialect == "onnx":
            return self._call_onnx(graph)
        gm = graph.fx
        before = graph.node_count()
        identities = 0
        for node in list(gm.graph.nodes):
            if _is_identity(node):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                identities += 1
        gm.graph.eliminate_dead_code()
        tensors = drop_unused_attrs(gm)
        removed = before - graph.node_count()
        stats = {"identity_ops": identities, "dead_nodes": removed - identities, "unused_tensors": tensors}
        return PassResult(graph, removed > 0 or tensors > 0, stats)

    def _call_onnx(self, graph) -> PassResult:
        from onnx_ir.passes.common import IdentityEliminationPass, RemoveUnusedNodesPass

        before = graph.node_count()
        modified = False
        for p in (IdentityEliminationPass(), RemoveUnusedNodesPass()):
            modified |= p(graph.onnx).modified
        return PassResult(graph, modified, {"removed_nodes": before - graph.node_count()})
