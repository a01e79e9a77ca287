"""``rf.dynamo_backend``: rarefy as a ``torch.compile`` compiler stage.

``torch.compile(model, backend=rf.dynamo_backend(passes=[...]))`` hands each graph that
TorchDynamo captures to rarefy. Dynamo (torch >= 2.5, built-in ``nn.Module`` inlining) gives
an FX GraphModule of torch-level calls whose parameters and buffers are *inputs*
(placeholders with the real tensors as example values) and, after a recompile for a new
shape, ``SymInt`` inputs for the dynamic sizes. Passes need weights the graph owns, so each
graph is first *frozen*:

* every parameter / buffer placeholder becomes a ``get_attr`` of the tensor under its
  qualified name (``model.layers.0.self_attn.q_proj.weight``, read from Dynamo's source),
  so sites are named as in the user's model and ``targets=`` globs work;
* every ``SymInt`` placeholder becomes ``sym_size(tensor, dim)`` of the input it measures;
* ``nn_module_stack`` paths drop Dynamo's ``L['self']`` prefix.

The frozen module is re-captured with ``rf.capture`` (dynamic exactly where Dynamo's
example values are symbolic), optimized with ``rf.optimize`` and lowered with
``rf.compile(graph, backend)``. The returned callable takes Dynamo's full argument list and
passes on only the real inputs. Weights are baked in at compile time, like Inductor's
freezing: the compiled function is for inference (it runs under ``no_grad``) and does not
see later in-place edits of the model's parameters.

Graph breaks give several graphs; each is optimized on its own. A graph rarefy cannot use
(no site for the passes, a capture that fails, inputs other than tensors and their sizes,
writes into a parameter or buffer such as a cache) falls back to Dynamo's own graph, with
the reason logged and kept in ``backend.subgraphs``. Other errors (a pass that fails, an
exact pass beyond its tolerance) are bugs to see, not to hide: torch.compile raises them.
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch.export import Dim

from .ir.errors import CalibrationError, CaptureError, InputMismatchError, UnsupportedError
from .ir.fx_utils import get_tensor

log = logging.getLogger(__name__)

_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_][A-Za-z0-9_]*)")
_ROOT_PREFIX = re.compile(r"^[LG]\['[^']+'\]")  # the module Dynamo read weights from


@dataclass
class Subgraph:
    """One graph Dynamo handed over: what rarefy did with it, and why."""

    index: int
    status: str  # "compiling" | "pending calibration" | "optimized" | "fallback"
    reason: str = ""
    graph: Any = None  # the optimized rf.Graph
    report: Any = None  # its rf.Report
    compiled: Any = None  # what rf.compile returned for it (e.g. a TritonModule)
    calibration: list = field(default_factory=list)


class DynamoBackend:
    """A ``torch.compile`` backend: ``fn(gm, example_inputs) -> callable``."""

    def __init__(self, passes: Sequence, calibration: int | None = None, backend: str = "torch",
                 verify: bool = False, backend_options: dict | None = None, **optimize_kwargs):
        from .backends import BACKENDS
        from .passes.manager import validate_order

        validate_order(list(passes))  # a wrong pipeline fails here, not inside torch.compile
        if backend not in BACKENDS:
            raise UnsupportedError(f"rf.dynamo_backend: unknown backend {backend!r}; choose one of {BACKENDS}")
        if calibration is not None and (isinstance(calibration, bool) or not isinstance(calibration, int)
                                        or calibration < 1):
            raise UnsupportedError(
                "rf.dynamo_backend: calibration is the number of first calls whose inputs calibrate each "
                f"compiled graph (an int >= 1), got {calibration!r}; Dynamo's graphs have their own inputs, "
                "so batches for the whole model cannot be handed to them"
            )
        needy = [p.name for p in passes if p.needs_calibration]
        if needy and calibration is None:
            raise CalibrationError(f"rf.dynamo_backend: {needy} need calibration: pass calibration=N to record "
                                   "each graph's inputs during its first N calls")
        self.passes = list(passes)
        self.calibration = calibration
        self.backend = backend
        self.backend_options = dict(backend_options or {})
        self.verify = verify
        self.optimize_kwargs = {"progress": False, **optimize_kwargs}
        self.subgraphs: list[Subgraph] = []

    @property
    def reports(self) -> list:
        """The rf.Report of every graph rarefy optimized, in compile order."""
        return [s.report for s in self.subgraphs if s.report is not None]

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        record = Subgraph(index=len(self.subgraphs), status="compiling")
        self.subgraphs.append(record)
        try:
            frozen = freeze(gm, example_inputs)
        except UnsupportedError as exc:
            return self._fall_back(record, gm, str(exc))
        if self.calibration is None:
            return self._compile(record, gm, frozen, example_inputs, calibration=None)
        record.status = "pending calibration"
        return _CalibratingFunction(self, record, gm, frozen, self.calibration)

    def _compile(self, record: Subgraph, gm, frozen: "Frozen", example_inputs, calibration):
        from . import api, backends, ir

        inputs = frozen.inputs(example_inputs)
        try:
            with _outside_dynamo():  # export must not reuse Dynamo's fake mode and shape guards
                graph = ir.capture(frozen.module, tuple(inputs), dynamic_shapes=frozen.dynamic_shapes)
                graph.meta["source"] = f"dynamo graph {record.index}"
                optimized = api.optimize(graph, self.passes, calibration=calibration, verify=self.verify,
                                         **self.optimize_kwargs)
                compiled = backends.compile_graph(optimized, self.backend, **self.backend_options)
        except (CaptureError, UnsupportedError, InputMismatchError) as exc:
            return self._fall_back(record, gm, f"{type(exc).__name__}: {exc}")
        record.status, record.graph, record.report = "optimized", optimized, optimized.report
        record.compiled = compiled
        log.info("rarefy: dynamo graph %d optimized\n%s", record.index, optimized.report.table())
        return frozen.wrap(compiled)

    @staticmethod
    def _fall_back(record: Subgraph, gm, reason: str):
        record.status, record.reason = "fallback", reason
        log.warning("rarefy: dynamo graph %d runs unchanged: %s", record.index, reason)
        return gm.forward


def dynamo_backend(passes: Sequence, calibration: int | None = None, backend: str = "torch",
                   verify: bool = False, backend_options: dict | None = None, **optimize_kwargs) -> DynamoBackend:
    """A ``torch.compile`` backend that runs ``passes`` over every graph Dynamo captures.

    ``backend`` lowers each optimized graph ("torch", "onnxruntime" or "triton"), with
    ``backend_options`` (e.g. ``{"optimize": False, "threads": 2}`` for ONNX Runtime).
    ``calibration=N`` runs each graph unchanged for its first N calls, records their inputs
    and then optimizes it with them as calibration batches (for calibrated methods such as
    GPTQ); ``verify`` and the remaining keywords (``budget``, ``progress``) go to
    ``rf.optimize``. ``.subgraphs`` / ``.reports`` say what happened to every graph.
    """
    return DynamoBackend(passes, calibration=calibration, backend=backend, verify=verify,
                         backend_options=backend_options, **optimize_kwargs)


class _CalibratingFunction:
    """Runs Dynamo's graph for the first N calls, recording inputs, then swaps in rarefy's."""

    def __init__(self, owner: DynamoBackend, record: Subgraph, gm, frozen: "Frozen", n_calls: int):
        self.owner, self.record, self.gm, self.frozen, self.n_calls = owner, record, gm, frozen, n_calls
        self.compiled = None

    def __call__(self, *args):
        if self.compiled is not None:
            return self.compiled(*args)
        self.record.calibration.append(tuple(t.detach().clone() for t in self.frozen.inputs(args)))
        if len(self.record.calibration) >= self.n_calls:
            batches, self.record.calibration = self.record.calibration, []
            self.compiled = self.owner._compile(self.record, self.gm, self.frozen, args, calibration=batches)
        return self.gm.forward(*args)


@contextmanager
def _outside_dynamo():
    """Leave Dynamo's tracing context: a nested export would pick up its fake mode and guards."""
    with torch._guards.tracing(None):
        yield


# -- freezing: parameters and sizes become part of the graph ------------------------------------
@dataclass
class Frozen:
    module: torch.fx.GraphModule  # tensor inputs only; weights are attributes
    input_positions: list[int]  # which of Dynamo's arguments are the module's inputs
    dynamic_shapes: dict  # placeholder name -> {dim: Dim.AUTO} where Dynamo's example is symbolic

    def inputs(self, args: Sequence) -> list:
        return [args[i] for i in self.input_positions]

    def wrap(self, compiled):
        positions = self.input_positions

        def run(*args):
            out = compiled(*[args[i] for i in positions])
            return out if isinstance(out, (tuple, list)) else (out,)

        return run


def freeze(gm: torch.fx.GraphModule, example_inputs: Sequence) -> Frozen:
    """Dynamo's graph with parameters/buffers as attributes and sizes computed from inputs."""
    graph = torch.fx.Graph()
    env: dict = {}
    root = torch.nn.Module()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise UnsupportedError(f"Dynamo gave {len(example_inputs)} example inputs for {len(placeholders)} placeholders")
    by_source = {_source_name(n): n for n in placeholders}
    positions, sizes, dynamic_shapes = [], [], {}
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        path = _weight_path(node, value)
        if path is not None:
            _set_tensor(root, path, value)
            env[node] = graph.get_attr(path)
        elif isinstance(value, torch.Tensor):
            env[node] = graph.placeholder(node.name)
            positions.append(i)
            dims = _symbolic_dims(node)
            dynamic_shapes[node.name] = {d: Dim.AUTO for d in dims} if dims else None
        elif isinstance(value, (int, torch.SymInt)):
            sizes.append(node)
        else:
            raise UnsupportedError(f"input {node.name} is a {type(value).__name__}; rarefy takes tensors and sizes")
    for node in sizes:  # a size is read off the tensor Dynamo measured it from
        env[node] = _size_of_input(graph, node, by_source, env)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
        if "nn_module_stack" in node.meta:
            env[node].meta["nn_module_stack"] = _clean_stack(node.meta["nn_module_stack"])
    _check_no_weight_writes(gm, [n for n in placeholders if env[n].op == "get_attr"])
    _copy_attributes(gm, root)
    module = torch.fx.GraphModule(root, graph, class_name="RarefyDynamoGraph")
    return Frozen(module, positions, dynamic_shapes)


def _size_of_input(graph: torch.fx.Graph, node, by_source: dict, env: dict) -> torch.fx.Node:
    """``sym_size(x, d)`` for a SymInt placeholder whose source is ``x.size()[d]``."""
    from torch._dynamo.source import TensorProperty, TensorPropertySource

    source = node.meta["grapharg"].source
    tensor = by_source.get(source.base.name) if isinstance(source, TensorPropertySource) else None
    if tensor is None or env[tensor].op != "placeholder" or source.prop is not TensorProperty.SIZE:
        raise UnsupportedError(f"the integer input {getattr(source, 'name', node.name)} is not the size of a "
                               "tensor input; rarefy graphs take tensors")
    return graph.call_function(torch.ops.aten.sym_size.int, (env[tensor], source.idx))


def _check_no_weight_writes(gm: torch.fx.GraphModule, weights: list) -> None:
    """Freezing is wrong for a graph that writes into a parameter or buffer (a cache, a counter)."""
    weights = set(weights)
    for node in gm.graph.nodes:
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        in_place = (name.endswith("_") and not name.endswith("__")) or name == "setitem"
        if node.op in ("call_method", "call_function") and in_place and node.args and node.args[0] in weights:
            raise UnsupportedError(f"the graph writes into {node.args[0].name} ({name}); rarefy freezes "
                                   "parameters and buffers, so it leaves this graph to Dynamo")


def _source_name(node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    return getattr(source, "name", None) if source is not None else None


def _weight_path(node, value) -> str | None:
    """The qualified name of a parameter/buffer placeholder; None for a model input."""
    name = _source_name(node) or ""
    if not isinstance(value, torch.Tensor) or not _ROOT_PREFIX.match(name):
        return None
    if not (isinstance(value, torch.nn.Parameter) or "_buffers[" in name or "_parameters[" in name):
        return None
    parts = [a or b for a, b in _SOURCE_PART.findall(_ROOT_PREFIX.sub("", name))]
    return ".".join(parts) if parts else None


def _symbolic_dims(node) -> list[int]:
    example = node.meta.get("example_value")
    if example is None:
        return []
    return [d for d, size in enumerate(example.shape) if not isinstance(size, int)]


def _clean_stack(stack: dict) -> dict:
    out = {}
    for key, (path, cls) in stack.items():
        parts = [a or b for a, b in _SOURCE_PART.findall(_ROOT_PREFIX.sub("", path))]
        out[key] = (".".join(parts), cls)
    return out


def _copy_attributes(gm: torch.fx.GraphModule, root: torch.nn.Module) -> None:
    """Tensors and submodules Dynamo's own graph reads through get_attr (lifted constants)."""
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            _set_tensor(root, node.target, get_tensor(gm, node.target))


def _set_tensor(root: torch.nn.Module, path: str, value) -> None:
    owner = root
    *parents, attr = path.split(".")
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if isinstance(value, torch.nn.Module):
        owner.add_module(attr, value)
    elif isinstance(value, torch.nn.Parameter):
        owner.register_parameter(attr, torch.nn.Parameter(value.detach(), requires_grad=False))
    else:
        owner.register_buffer(attr, value.detach())
