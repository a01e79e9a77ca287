"""The optimizer that ``torch.onnx.export(optimize=True)`` runs stays linear in the graph's size.

onnxscript's multi-output rewrite rule ``SlicesSplit`` walked the whole graph for every node
the rewriter asked it about, so each optimizer pass was quadratic in the number of nodes
(527 s of the 715 s export of SmolLM2's 30-layer KIVI int4 decode step). ``onnx_lowering`` guards
those rules' matchers with a local check of the first output node; these tests check that the
guard is installed, that the number of graph walks no longer grows with the graph, and that
the rule still fires with the same result.
"""
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper
from onnxscript import optimizer

from rarefy.backends import onnx_lowering  # noqa: F401  (installs the guard)
from rarefy.backends.onnx_lowering import _FirstOutputGuard, _guard_multi_output_rules

IR_VERSION = 10  # onnx 1.23 writes 14 by default; this ONNX Runtime reads up to 13


def _chain(n: int) -> onnx.ModelProto:
    """y = x + 1 + 1 ... (n Adds): no Slice anywhere."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    nodes = [helper.make_node("Add", ["x" if i == 0 else f"h{i - 1}", "one"], [f"h{i}" if i < n - 1 else "y"])
             for i in range(n)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [one])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=IR_VERSION)


def _walks_while_optimizing(model: onnx.ModelProto, monkeypatch) -> int:
    walks = 0
    iterate = ir.Graph.__iter__

    def counted(self):
        nonlocal walks
        walks += 1
        return iterate(self)

    monkeypatch.setattr(ir.Graph, "__iter__", counted)
    optimizer.optimize_ir(ir.serde.deserialize_model(model))
    monkeypatch.undo()
    return walks


def test_every_default_multi_output_rule_is_guarded():
    from onnxscript import rewriter

    multi = [r for r in rewriter._DEFAULT_REWRITE_RULES if len(r._matcher.pattern.output_nodes) > 1]
    assert multi, "onnxscript has no multi-output default rule any more: the guard can go"
    assert all(isinstance(r._matcher, _FirstOutputGuard) for r in multi)
    assert _guard_multi_output_rules() == len(multi)  # idempotent: no guard around a guard
    assert not any(isinstance(r._matcher.inner, _FirstOutputGuard) for r in multi)


def test_graph_walks_do_not_grow_with_the_graph(monkeypatch):
    # one walk per node and pass was the quadratic term; a constant number of walks remains
    small, large = (_walks_while_optimizing(_chain(n), monkeypatch) for n in (20, 200))
    assert small == large, (small, large)
    assert large < 200


def test_slices_split_still_fires_and_is_exact():
    # y = x[:, :2] * x[:, 2:] from two Slices of x's last axis: SlicesSplit makes them one Split.
    # The [2, 4) Slice comes first: the matcher returns its first structural match, and paired with
    # itself the [0, 2) Slice matches structurally and then fails the rule's check (upstream behaviour)
    ints = [helper.make_tensor(name, TensorProto.INT64, [1], [v])
            for name, v in (("b0", 0), ("e0", 2), ("b1", 2), ("e1", 4), ("axis", -1))]
    nodes = [helper.make_node("Slice", ["x", "b1", "e1", "axis"], ["s1"]),
             helper.make_node("Slice", ["x", "b0", "e0", "axis"], ["s0"]),
             helper.make_node("Mul", ["s0", "s1"], ["y"])]
    graph = helper.make_graph(nodes, "slices", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])], ints)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=IR_VERSION)
    optimized = optimizer.optimize(model)
    ops = [n.op_type for n in optimized.graph.node]
    assert ops == ["Split", "Mul"], ops
    onnx.checker.check_model(optimized)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(optimized.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    np.testing.assert_array_equal(got, x[:, :2] * x[:, 2:])  # the same one fp32 product: exact


def test_a_guarded_rule_rejects_other_ops_without_walking_the_graph():
    from onnxscript import rewriter

    rule = next(r for r in rewriter._DEFAULT_REWRITE_RULES if isinstance(r._matcher, _FirstOutputGuard))
    model = ir.serde.deserialize_model(_chain(3))
    add = next(iter(model.graph))

    class Unwalkable:
        def __iter__(self):
            raise AssertionError("walked the graph")

    assert not rule._matcher.match(model, Unwalkable(), add)
