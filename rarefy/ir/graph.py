"""``rf.Graph``: one object for both dialects.

* ``fx``: a ``torch.fx.GraphModule`` unlifted from ``torch.export`` (parameters and the
  packed tensors that passes create are attributes of the module; rarefy ops are
  ``torch.ops.rarefy.*`` calls). It runs directly in PyTorch: this is the reference.
* ``onnx``: an ``onnx_ir.Model``. Its reference execution is ONNX Runtime with every
  graph optimisation turned off, so what runs is exactly the graph that was written.

A Graph is called like the model it came from (``g(*args, **kwargs)``) and returns the
model's own output structure. Passes never change a Graph in place: they work on
``graph.copy()``.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from .errors import InputMismatchError, RarefyError
from .signature import Signature, split_inputs

DIALECTS = ("fx", "onnx")


class Graph:
    """A captured or loaded model: program, call signature and provenance."""

    def __init__(self, dialect: str, program: Any, signature: Signature, meta: dict | None = None):
        if dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {dialect!r}; expected one of {DIALECTS}")
        self.dialect = dialect
        self.program = program
        self.signature = signature
        self.meta: dict = dict(meta or {})
        self.report = None  # rf.Report, set by rf.optimize
        self.recipe: list[dict] = []  # the pass specs that produced this graph
        self._session = None  # cached ONNX Runtime session (onnx dialect only)

    # -- running -------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.signature.unflatten(self.run_flat(self.signature.flatten(args, kwargs)))

    def run_flat(self, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run on flattened inputs (signature order); return flattened tensor outputs."""
        if self.dialect == "fx":
            args, kwargs = torch.utils._pytree.tree_unflatten(list(leaves), self.signature.in_spec)
            with torch.no_grad():
                out = self.program(*args, **kwargs)
            return [t for t in torch.utils._pytree.tree_leaves(out)]
        from .onnx_dialect import run_onnx

        if self._session is None:
            self._session = _onnx_session(self.program)
        return run_onnx(self._session, self.signature.names, leaves)

    def run_batch(self, batch: Any) -> list[torch.Tensor]:
        """Run one calibration/evaluation batch (tuple or dict); flattened tensor outputs."""
        return self.run_flat(self.batch_leaves(batch))

    def batch_leaves(self, batch: Any) -> list[torch.Tensor]:
        """The flat inputs (signature order) of one batch; graphs whose calls carry state
        (a decoder's past) complete a batch that gives only the model's own inputs."""
        return self.signature.flatten(*split_inputs(batch))

    # -- structure -----------------------------------------------------------------------
    @property
    def fx(self) -> torch.fx.GraphModule:
        if self.dialect != "fx":
            raise RarefyError("this graph is in the ONNX dialect; it has no torch.fx module")
        return self.program

    @property
    def onnx(self):
        if self.dialect != "onnx":
            raise RarefyError("this graph is in the FX dialect; export it with rf.export_onnx first")
        return self.program

    def sites(self, kind: str) -> list:
        """Compression targets of one kind: 'linear', 'block', 'attention' or 'kv_cache'."""
        from .sites import find_sites

        return find_sites(self, kind)

    def copy(self) -> "Graph":
        """A new graph: program and metadata copied, the report not.

        FX: the module tree and the fx graph are deep-copied but the weight tensors are shared,
        so a copy costs no weight memory (a pass on a 1 GB model does not need another 1 GB).
        This is safe because passes never write into a tensor: they replace the attribute
        that holds it (``fx_utils.add_tensor`` / ``fx_utils.set_tensor``). Code that writes into an
        optimized graph's weights in place should ``copy.deepcopy(graph.fx)`` first.
        ONNX: the model is cloned, initializers included.
        """
        if self.dialect == "fx":
            shared = {id(t): t for t in _fx_tensors(self.program)}
            program = copy.deepcopy(self.program, shared)
        else:
            from .onnx_dialect import clone_model

            program = clone_model(self.program)
        out = Graph(self.dialect, program, copy.deepcopy(self.signature), copy.deepcopy(self.meta))
        out.recipe = list(self.recipe)
        return out

    def parameter_bytes(self) -> int:
        """Bytes of every parameter, buffer and constant the program carries."""
        if self.dialect == "fx":
            seen, total = set(), 0
            for t in list(self.program.parameters()) + list(self.program.buffers()):
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
            for name in _fx_constant_attrs(self.program):
                t = _get_attr(self.program, name)
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
            return total
        from .onnx_dialect import initializer_bytes

        return initializer_bytes(self.program)

    def node_count(self) -> int:
        if self.dialect == "fx":
            return sum(1 for n in self.program.graph.nodes if n.op == "call_function")
        return sum(1 for _ in self.program.graph.all_nodes())

    def invalidate(self) -> None:
        """Drop cached executables after the program was rewritten."""
        self._session = None
        if self.dialect == "fx":
            self.program.recompile()

    def __repr__(self) -> str:
        source = self.meta.get("source", "model")
        return (
            f"rf.Graph({source}, dialect={self.dialect}, nodes={self.node_count()}, "
            f"params={self.parameter_bytes() / 1e6:.2f} MB, inputs={self.signature.describe()})"
        )


def _fx_tensors(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    """Every parameter, buffer and tensor constant the program reads."""
    tensors = list(gm.parameters()) + list(gm.buffers())
    tensors += [t for t in (_get_attr(gm, name) for name in _fx_constant_attrs(gm)) if isinstance(t, torch.Tensor)]
    return tensors


def _fx_constant_attrs(gm: torch.fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "get_attr"]


def _get_attr(module: torch.nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _onnx_session(model):
    from .onnx_dialect import make_session

    return make_session(model)


def check_graph(obj: Any, who: str) -> Graph:
    """Raise a clear TypeError when something other than a rf.Graph is passed."""
    if not isinstance(obj, Graph):
        hint = " (capture it first with rf.capture(model, example_inputs))" if isinstance(obj, torch.nn.Module) else ""
        raise InputMismatchError(f"{who} expects a rf.Graph, got {type(obj).__name__}{hint}")
    return obj
