"""The ONNX Runtime backend: export (or serialise) the graph, open an InferenceSession.

The callable takes the model's own call convention and returns torch tensors in the
model's output structure. ``optimize=True`` (the default) turns ONNX Runtime's graph
optimisations on, as a deployment would; tests that compare numbers turn them off.
"""
from __future__ import annotations

from ..ir.graph import Graph
from ..ir.onnx_dialect import make_session, run_onnx
from .onnx_lowering import to_onnx_model


class OnnxRuntimeModule:
    """A compiled graph: call it like the model."""

    backend = "onnxruntime"

    def __init__(self, graph: Graph, optimize: bool = True, threads: int | None = None):
        self.signature = graph.signature
        self.model_proto = to_onnx_model(graph)
        self.session = make_session(self.model_proto.SerializeToString(), optimize=optimize, threads=threads)
        onnx_names = [i.name for i in self.session.get_inputs()]
        self.input_names = [n for n in self.signature.names if n in onnx_names]
        if len(self.input_names) != len(onnx_names):
            self.input_names = onnx_names
        self._used = [self.signature.names.index(n) if n in self.signature.names else i
                      for i, n in enumerate(self.input_names)]

    def __call__(self, *args, **kwargs):
        leaves = self.signature.flatten(args, kwargs)
        outputs = run_onnx(self.session, self.input_names, [leaves[i] for i in self._used])
        return self.signature.unflatten(outputs)
