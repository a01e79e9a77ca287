"""Backends: torch (the reference), onnxruntime and triton."""
from __future__ import annotations

from ..ir.errors import UnsupportedError
from ..ir.graph import Graph, check_graph

BACKENDS = ("torch", "onnxruntime", "triton")


def compile_graph(graph: Graph, backend: str = "torch", **options):
    """A callable with the model's call convention, torch tensors out."""
    check_graph(graph, "rf.compile")
    if backend == "torch":
        if options:
            raise UnsupportedError(f"the torch backend takes no options, got {sorted(options)}")
        return graph
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeModule

        return OnnxRuntimeModule(graph, **options)
    if backend == "triton":
        from .triton import TritonModule

        return TritonModule(graph, **options)
    raise UnsupportedError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
