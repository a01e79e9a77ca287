"""The ONNX dialect: load an ONNX file with onnx-ir, run it, copy it, measure it.

``load(path)`` validates the file (``onnx.checker``) and reads it into an
``onnx_ir.Model``; a missing, truncated or corrupt file raises ``LoadError`` naming the
file and what is wrong with it. Reference execution is ONNX Runtime on the CPU with all
graph optimisations off, so the numbers are those of the graph as written.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import LoadError
from .graph import Graph
from .signature import Signature

_ONNX_TO_TORCH = {
    "FLOAT": torch.float32, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16, "DOUBLE": torch.float64,
    "INT64": torch.int64, "INT32": torch.int32, "INT16": torch.int16, "INT8": torch.int8,
    "UINT8": torch.uint8, "BOOL": torch.bool,
}


def load(path: str | os.PathLike) -> Graph:
    """Read an ONNX file (external data beside it is followed) into an ONNX-dialect Graph."""
    import onnx
    import onnx_ir as ir

    path = Path(path)
    if not path.is_file():
        raise LoadError(f"rf.load: no such file: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=True)
    except Exception as exc:
        raise LoadError(f"rf.load: {path} is not a readable ONNX model (truncated or corrupt?): {exc}") from exc
    if len(proto.graph.node) == 0 and len(proto.graph.output) == 0:
        raise LoadError(f"rf.load: {path} holds no ONNX graph (empty or not an ONNX file)")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise LoadError(f"rf.load: {path} fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    model = ir.serde.deserialize_model(proto)
    return Graph("onnx", model, onnx_signature(model), {"source": path.name, "path": str(path)})


def onnx_signature(model) -> Signature:
    names, dtypes, shapes = [], [], []
    initializer_names = set(model.graph.initializers)
    for value in model.graph.inputs:
        if value.name in initializer_names:
            continue
        names.append(value.name)
        dtypes.append(_ONNX_TO_TORCH.get(value.dtype.name, torch.float32) if value.dtype is not None else torch.float32)
        dims = value.shape.dims if value.shape is not None else ()
        shapes.append(tuple(d if isinstance(d, int) else None for d in dims))
    return Signature(names, dtypes, shapes, in_spec=None, out_spec=None)


def serialize(model) -> bytes:
    import onnx_ir as ir

    return ir.serde.serialize_model(model).SerializeToString()


def clone_model(model):
    import onnx_ir as ir

    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def initializer_bytes(model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def make_session(model_or_bytes, optimize: bool = False, threads: int | None = None):
    """An ONNX Runtime CPU session; optimisations off unless asked (reference runs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    data = model_or_bytes if isinstance(model_or_bytes, (bytes, str)) else serialize(model_or_bytes)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run_onnx(session, names: list[str], leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    feeds = {name: _to_numpy(t) for name, t in zip(names, leaves)}
    outputs = session.run(None, feeds)
    return [torch.from_numpy(np.ascontiguousarray(o)) for o in outputs]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()
