"""Lowering rarefy ops to ONNX Runtime operators, and writing ONNX artifacts.

FX-dialect graphs are re-exported with ``torch.export`` (dynamic batch and sequence as at
capture) and converted by ``torch.onnx.export(dynamo=True)`` with a custom translation
table mapping each rarefy op onto ONNX Runtime operators through
``onnxscript.values.Opset("com.microsoft", 1)``. onnxscript looks ops up in ``onnx.defs``,
where ONNX Runtime's contrib ops are not registered, so each contrib op used gets an
``OpSchema`` registered once (``contrib_schema``).

``accuracy_level`` of MatMulNBits is 0 (unset: activations stay fp32 inside the kernel).
ONNX Runtime's level 4 quantizes activations to int8 on the fly, which is faster but loses
accuracy on some models (onnxruntime#29849: wrong tokens at the default level); rarefy's
weight-only quantization promises weight error only, so it does not opt into that.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import onnx
import torch
from onnx import defs

from ..ir.errors import RarefyError, UnsupportedError
from ..ir.graph import Graph, check_graph
from ..ir.io import atomic_path
from .onnx_cleanup import without_softmax_nan_guards

log = logging.getLogger(__name__)
# torch.onnx warns on every export that torchvision's ops cannot be registered; rarefy needs none
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

MSFT_DOMAIN = "com.microsoft"
TRANSLATIONS: dict = {}  # torch op overload -> onnxscript translation function


def onnx_translation(op):
    """Register the ONNX translation of a rarefy op."""
    def register(fn):
        TRANSLATIONS[op] = fn
        return fn

    return register


DECOMPOSITIONS: dict = {}  # torch op overload -> branch-free torch function, traced into standard ONNX ops


def onnx_decomposition(op, fn) -> None:
    """Lower a rarefy op by tracing ``fn`` (same signature, export-traceable torch) at ONNX export."""
    DECOMPOSITIONS[op] = fn


def _decomposed(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm``, or a copy whose ops with a registered decomposition call it instead."""
    if not any(n.op == "call_function" and n.target in DECOMPOSITIONS for n in gm.graph.nodes):
        return gm
    import copy

    gm = copy.deepcopy(gm)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in DECOMPOSITIONS:
            node.target = DECOMPOSITIONS[node.target]
    gm.recompile()
    return gm


def contrib_schema(name: str, inputs: list[tuple[str, str, bool]], outputs: list[tuple[str, str]],
                   types: list[tuple[str, list[str]]], attributes: list[tuple[str, str, bool]]) -> None:
    """Register an ONNX Runtime contrib op's schema with onnx.defs (once) for onnxscript."""
    if defs.has(name, MSFT_DOMAIN):
        return
    OpSchema = defs.OpSchema
    optional = OpSchema.FormalParameterOption.Optional
    attr_types = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT, "ints": OpSchema.AttrType.INTS}
    schema = OpSchema(
        name, MSFT_DOMAIN, 1,
        inputs=[OpSchema.FormalParameter(n, t, param_option=optional) if opt else OpSchema.FormalParameter(n, t)
                for n, t, opt in inputs],
        outputs=[OpSchema.FormalParameter(n, t) for n, t in outputs],
        type_constraints=[(t, allowed, "") for t, allowed in types],
        attributes=[OpSchema.Attribute(n, attr_types[kind], "", required=required) for n, kind, required in attributes],
    )
    defs.register_schema(schema)


def msft_opset():
    import onnxscript

    return onnxscript.values.Opset(MSFT_DOMAIN, 1)


# -- rarefy::matmul_nbits -> com.microsoft::MatMulNBits ---------------------------------------
contrib_schema(
    "MatMulNBits",
    inputs=[("A", "T1", False), ("B", "T2", False), ("scales", "T1", False), ("zero_points", "T3", True),
            ("g_idx", "T4", True), ("bias", "T1", True)],
    outputs=[("Y", "T1")],
    types=[("T1", ["tensor(float)", "tensor(float16)"]), ("T2", ["tensor(uint8)", "tensor(int32)"]),
           ("T3", ["tensor(uint8)", "tensor(int32)", "tensor(float16)", "tensor(float)"]), ("T4", ["tensor(int32)"])],
    attributes=[("K", "int", True), ("N", "int", True), ("bits", "int", True), ("block_size", "int", True),
                ("accuracy_level", "int", False)],
)

MATMUL_NBITS_BITS = (2, 4, 8)  # what ONNX Runtime's CPU MatMulNBits runs; 3 bits lowers to a dequant subgraph


@onnx_translation(torch.ops.rarefy.matmul_nbits.default)
def _matmul_nbits(x, qweight, scales, zero_points, bias, K, N, bits, block_size):
    from onnxscript import opset18 as op

    if bits not in MATMUL_NBITS_BITS:  # no MatMulNBits kernel: dequantize with standard ops
        from .onnx_quant import dequant_matmul_nbits

        return dequant_matmul_nbits(x, qweight, scales, zero_points, bias, K, N, bits, block_size)
    flat = op.Constant(value_ints=[-1])
    zp = op.Reshape(zero_points, flat) if zero_points is not None else None
    extra = [None, bias] if bias is not None else []
    return msft_opset().MatMulNBits(x, qweight, op.Reshape(scales, flat), zp, *extra,
                                    K=K, N=N, bits=bits, block_size=block_size, accuracy_level=0)


# -- onnxscript's optimizer: multi-output rewrite rules in linear time ------------------------------
class _FirstOutputGuard:
    """A multi-output pattern's matcher that first checks the node it starts from.

    onnxscript's ``SimplePatternMatcher`` matches a pattern with several output nodes (the
    default rule ``SlicesSplit``: two Slices of one tensor) by indexing *every* node of the
    graph by op type before it looks at the node it was asked about; the rewriter asks about
    every node, so each of its passes was quadratic in the graph's size (SmolLM2's 30-layer
    KIVI int4 decode step: 527 s of a 715 s export; 31 s guarded, the same graph byte for
    byte). The first output node is matched against that node in every combination the
    matcher tries, so a node it does not match (op, domain, attributes: a local check) can
    match no combination: failing there at once returns what the matcher would, without
    the walk.
    """

    def __init__(self, matcher):
        self.inner, self.pattern = matcher, matcher.pattern

    def match(self, model, graph_or_function, node, **kwargs):
        from onnxscript.rewriter import _basics

        first = self.pattern.output_nodes[0].matches(node, _basics.MatchResult())
        return self.inner.match(model, graph_or_function, node, **kwargs) if first else first

    def __str__(self) -> str:
        return str(self.inner)


@contextlib.contextmanager
def guarded_multi_output_rules():
    """Guard the matchers of onnxscript's default multi-output rules (the ones
    ``torch.onnx.export(optimize=True)`` runs) inside the block, and put the originals back after
    it: rarefy's own exports get the linear-time matcher, while importing rarefy leaves
    onnxscript's global rules alone. Yields how many rules are guarded; nesting adds no guard."""
    from onnxscript import rewriter

    swapped, guarded = [], 0
    for rule in getattr(rewriter, "_DEFAULT_REWRITE_RULES", ()):
        matcher = getattr(rule, "_matcher", None)
        if matcher is None or len(getattr(getattr(matcher, "pattern", None), "output_nodes", ())) < 2:
            continue
        if not isinstance(matcher, _FirstOutputGuard):
            rule._matcher = _FirstOutputGuard(matcher)
            swapped.append((rule, matcher))
        guarded += 1
    try:
        yield guarded
    finally:
        for rule, matcher in swapped:
            rule._matcher = matcher


# -- export -------------------------------------------------------------------------------------
KEPT_METADATA = ("pkg.torch.onnx.name_scopes",)  # read by rarefy.ir.onnx_sites


def to_onnx_model(graph: Graph) -> onnx.ModelProto:
    """The ONNX model of a graph (FX: re-export and translate; ONNX: serialise)."""
    if graph.dialect == "onnx":
        import onnx_ir as ir

        return ir.serde.serialize_model(graph.onnx)
    from torch.export import Dim

    args, kwargs = graph.meta["example_inputs"]
    dims = graph.meta.get("dynamic_shapes") or {}
    dynamic_shapes = {name: ({axis: Dim.DYNAMIC for axis in axes} if axes else None) for name, axes in dims.items()}
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), guarded_multi_output_rules():
            ep = torch.export.export(_decomposed(graph.fx), tuple(args), dict(kwargs), dynamic_shapes=dynamic_shapes or None,
                                     strict=False)
            program = torch.onnx.export(ep, dynamo=True, custom_translation_table=dict(TRANSLATIONS),
                                        optimize=True, verbose=False)
    except RarefyError:
        raise
    except Exception as exc:
        unsupported = _find_untranslated(graph)
        hint = f" (ops without an ONNX translation: {unsupported})" if unsupported else ""
        raise UnsupportedError(f"ONNX export of {graph.meta.get('source', 'graph')} failed: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0]}{hint}") from exc
    log.debug(sink.getvalue())
    proto, _ = without_softmax_nan_guards(_without_debug_metadata(program.model_proto))
    return proto


def _without_debug_metadata(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the exporter's per-node debug metadata (stack trace, FX node, class hierarchy:
    about 2 KB a node, 11 MB of a 3-bit SmolLM2 whose dequantize subgraphs are many small
    nodes); only the module path (``KEPT_METADATA``), which finds the sites of a reloaded
    ONNX file, stays."""
    graphs = [proto.graph, *(f for f in proto.functions)]
    while graphs:
        g = graphs.pop()
        for node in g.node:
            kept = [(p.key, p.value) for p in node.metadata_props if p.key in KEPT_METADATA]
            del node.metadata_props[:]
            for key, value in kept:
                node.metadata_props.add(key=key, value=value)
            graphs += [a.g for a in node.attribute if a.HasField("g")] + [sub for a in node.attribute for sub in a.graphs]
    return proto


def _find_untranslated(graph: Graph) -> list[str]:
    from ..ir.ops import is_rarefy_op

    return sorted({str(n.target) for n in graph.fx.graph.nodes
                   if n.op == "call_function" and is_rarefy_op(n.target)
                   and n.target not in TRANSLATIONS and n.target not in DECOMPOSITIONS})


def export_onnx(graph: Graph, path, check: bool = True) -> Path:
    """Write ``graph`` as an ONNX file with recipe.json and report.json beside it, together or
    not at all (a full disk leaves the previous files as they were); a graph without a report
    removes a report.json left there by an earlier export."""
    check_graph(graph, "rf.export_onnx")
    path = Path(path)
    if path.suffix != ".onnx":
        raise RarefyError(f"rf.export_onnx: the path must end in .onnx, got {path}")
    if path.exists() and path.is_dir():
        raise RarefyError(f"rf.export_onnx: {path} is a directory")
    proto = to_onnx_model(graph)
    if check:
        onnx.checker.check_model(proto)
    recipe = {"source": graph.meta.get("source"), "passes": graph.recipe}
    sidecars = {"recipe.json": recipe} | ({"report.json": graph.report.to_dict()} if graph.report is not None else {})
    # every file goes to its temporary first; only when all are written are they moved into place
    with contextlib.ExitStack() as stack:
        onnx.save_model(proto, str(stack.enter_context(atomic_path(path, ".onnx"))))
        for name, document in sidecars.items():
            stack.enter_context(atomic_path(path.parent / name)).write_bytes(json.dumps(document, indent=2).encode())
    if graph.report is None:
        (path.parent / "report.json").unlink(missing_ok=True)  # it would describe another model
    return path


from . import onnx_sparsity  # noqa: E402,F401  (registers the sparse linears' translations)
from . import onnx_kv  # noqa: E402,F401  (registers the KV-cache ops' lowerings)
from . import onnx_quant  # noqa: E402,F401  (registers the W8A8 linear's translation)
from . import onnx_tokens  # noqa: E402,F401  (registers the token ops' lowerings)
