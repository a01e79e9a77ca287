"""The exporter's no-op NaN guard after finitely masked softmax attention is removed, and only it."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import rarefy as rf
from rarefy.backends.onnx_cleanup import without_softmax_nan_guards
from tiny_models import build


def _attention(fill: float, guard_input: str = "p") -> onnx.ModelProto:
    """Softmax(s + Where(mask, 0, fill)) then Where(IsNaN(p), 0, p), as torch.onnx emits it."""
    nodes = [
        helper.make_node("Where", ["mask", "zero", "fill"], ["bias"]),
        helper.make_node("Add", ["s", "bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("IsNaN", [guard_input], ["nan"]),
        helper.make_node("Where", ["nan", "zero", guard_input], ["guarded"]),
        helper.make_node("MatMul", ["guarded", "v"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 4, 4]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, [2, 1, 4]),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 4, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4, 3])],
        [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
         numpy_helper.from_array(np.array(fill, np.float32), "fill")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_guard_after_finitely_masked_softmax_is_removed_and_outputs_are_unchanged():
    rng = np.random.default_rng(0)
    feeds = {"s": rng.standard_normal((2, 4, 4), dtype=np.float32),
             "mask": np.array([[[1, 1, 0, 1]], [[0, 0, 0, 0]]], dtype=bool),  # row 2: every key masked
             "v": rng.standard_normal((2, 4, 3), dtype=np.float32)}
    model = _attention(float(np.finfo(np.float32).min))
    before = _run(model, feeds)
    cleaned, removed = without_softmax_nan_guards(onnx.ModelProto.FromString(model.SerializeToString()))
    assert removed == 1
    assert [n.op_type for n in cleaned.graph.node] == ["Where", "Add", "Softmax", "Relu", "MatMul"]
    onnx.checker.check_model(cleaned)
    np.testing.assert_array_equal(_run(cleaned, feeds), before)


@pytest.mark.parametrize("fill, guard_input", [(float("-inf"), "p"), (float(np.finfo(np.float32).min), "r")])
def test_guards_that_can_act_are_kept(fill, guard_input):
    # a -inf mask makes an all-masked row 0/0; a guard on anything but such a softmax is not ours to judge
    model = _attention(fill, guard_input)
    cleaned, removed = without_softmax_nan_guards(onnx.ModelProto.FromString(model.SerializeToString()))
    assert removed == 0
    assert [n.op_type for n in cleaned.graph.node] == [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("name", ["bert", "distilbert"])
def test_exported_encoder_has_no_nan_guard_and_matches_torch(name, tmp_path):
    model, inputs = build(name)  # the last row is padded
    graph = rf.capture(model, inputs)
    path = rf.export_onnx(graph, tmp_path / "model.onnx")
    proto = onnx.load(str(path))
    assert "IsNaN" not in {n.op_type for n in proto.graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    out = session.run(None, {k: v.numpy() for k, v in inputs.items() if k in names})[0]
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state.numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-4)
