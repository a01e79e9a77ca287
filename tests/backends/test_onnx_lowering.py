"""The optimizer that ``torch.onnx.export(optimize=True)`` runs stays linear in the graph's size.

onnxscript's multi-output rewrite rule ``SlicesSplit`` walked the whole graph for every node
the rewriter asked it about, so each optimizer pass was quadratic in the number of nodes
(527 s of the 715 s export of SmolLM2's 30-layer KIVI int4 decode step). ``onnx_lowering`` guards
those rules' matchers with a local check of the first output node around its own export only
(importing rarefy changes nothing in onnxscript); these tests check that the guard is installed
inside ``guarded_multi_output_rules`` and during ``rf.export_onnx``, removed afterwards, that the
number of graph walks no longer grows with the graph, and that the rule still fires with the
same result.
"""
import errno
import json
import os
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnxscript import optimizer, rewriter

import rarefy as rf
from rarefy.backends.onnx_lowering import _FirstOutputGuard, guarded_multi_output_rules

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


def _multi_output_rules() -> list:
    return [r for r in rewriter._DEFAULT_REWRITE_RULES if len(r._matcher.pattern.output_nodes) > 1]


def test_importing_rarefy_leaves_onnxscripts_rules_alone():
    # rarefy is imported: no default rule of onnxscript's may carry rarefy's guard outside an export
    multi = _multi_output_rules()
    assert multi, "onnxscript has no multi-output default rule any more: the guard can go"
    assert not any(isinstance(r._matcher, _FirstOutputGuard) for r in multi)


def test_every_default_multi_output_rule_is_guarded_inside_the_context_and_restored_after():
    multi = _multi_output_rules()
    before = [r._matcher for r in multi]
    with guarded_multi_output_rules() as guarded:
        assert guarded == len(multi)
        assert all(isinstance(r._matcher, _FirstOutputGuard) for r in multi)
        with guarded_multi_output_rules() as again:  # nested: no guard around a guard
            assert again == len(multi)
            assert not any(isinstance(r._matcher.inner, _FirstOutputGuard) for r in multi)
        assert all(isinstance(r._matcher, _FirstOutputGuard) for r in multi)  # the outer guard stays
    assert [r._matcher for r in multi] == before  # the very same matcher objects are back
    with pytest.raises(RuntimeError, match="boom"), guarded_multi_output_rules():
        raise RuntimeError("boom")
    assert [r._matcher for r in multi] == before  # restored after a failure too


def test_export_onnx_runs_guarded_and_restores_the_rules(tmp_path, monkeypatch):
    seen = []
    export = torch.onnx.export

    def spy(*args, **kwargs):
        seen.append(all(isinstance(r._matcher, _FirstOutputGuard) for r in _multi_output_rules()))
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    graph = rf.capture(torch.nn.Linear(4, 3), (torch.randn(2, 4),))
    rf.export_onnx(graph, tmp_path / "model.onnx")
    assert seen == [True]
    assert not any(isinstance(r._matcher, _FirstOutputGuard) for r in _multi_output_rules())


def test_graph_walks_do_not_grow_with_the_graph(monkeypatch):
    # one walk per node and pass was the quadratic term; a constant number of walks remains
    with guarded_multi_output_rules():
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
    with guarded_multi_output_rules():
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
    model = ir.serde.deserialize_model(_chain(3))
    add = next(iter(model.graph))

    class Unwalkable:
        def __iter__(self):
            raise AssertionError("walked the graph")

    with guarded_multi_output_rules():
        rule = _multi_output_rules()[0]
        assert not rule._matcher.match(model, Unwalkable(), add)


# -- rf.export_onnx's files: the model, recipe.json and report.json together ---------------------------
@pytest.fixture(scope="module")
def linear_graphs():
    torch.manual_seed(0)
    graph = rf.capture(torch.nn.Linear(16, 8), (torch.randn(2, 16),))
    return graph, rf.optimize(graph, [rf.passes.EliminateDeadCode()], progress=False)


def test_export_replaces_stale_recipe_and_report(tmp_path, linear_graphs):
    plain, optimized = linear_graphs
    for name in ("recipe.json", "report.json"):
        (tmp_path / name).write_text('{"stale": true}')
    rf.export_onnx(optimized, tmp_path / "model.onnx")
    assert json.loads((tmp_path / "recipe.json").read_text())["passes"] == [{"pass": "EliminateDeadCode"}]
    assert rf.Report.load(tmp_path / "report.json").rows[-1].name == "EliminateDeadCode"
    rf.export_onnx(plain, tmp_path / "model.onnx")  # no report: the old one must not describe this model
    assert json.loads((tmp_path / "recipe.json").read_text())["passes"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "recipe.json"]


@pytest.mark.parametrize("failing", ["model", "report"])
def test_a_full_disk_is_a_rarefy_error_and_leaves_the_previous_files(tmp_path, linear_graphs, monkeypatch, failing):
    _, optimized = linear_graphs
    old = {"model.onnx": "old model", "recipe.json": '{"old": 1}', "report.json": '{"old": 2}'}
    for name, text in old.items():
        (tmp_path / name).write_text(text)

    def enospc():
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if failing == "model":
        def save_half(proto, path, *args, **kwargs):
            pathlib.Path(path).write_bytes(b"half a model")
            raise enospc()

        monkeypatch.setattr(onnx, "save_model", save_half)
    else:  # the model is written, then report.json's write fails: nothing may be replaced
        write_bytes = pathlib.Path.write_bytes

        def report_half(self, data):
            write_bytes(self, data[:4])
            if "report.json" in self.name:
                raise enospc()
            return write_bytes(self, data)

        monkeypatch.setattr(pathlib.Path, "write_bytes", report_half)
    with pytest.raises(rf.RarefyError, match="cannot write .*No space left on device") as info:
        rf.export_onnx(optimized, tmp_path / "model.onnx")
    assert isinstance(info.value, OSError)  # a WriteError: code that catches OSError still does
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == old  # no temporary file, nothing replaced
