"""Signature checks: ONNX-dialect graphs take numpy arrays as well as tensors (issue 13, point 3).

A graph loaded from an ONNX file is an ONNX Runtime program, and ONNX Runtime users hold numpy
arrays; they must not have to wrap them in torch tensors. Dtypes and shapes are checked as for
tensors.
"""
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper, save_model

import rarefy as rf


@pytest.fixture(scope="module")
def onnx_graph(tmp_path_factory):
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [numpy_helper.from_array(w, "w")])
    path = tmp_path_factory.mktemp("onnx") / "linear.onnx"
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    return rf.load(path), w


def test_onnx_graph_accepts_numpy_arrays(onnx_graph):
    g, w = onnx_graph
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    expected = torch.from_numpy(x @ w)
    # positional and keyword numpy give the tensor call's result: same ORT kernel, so fp32-exact
    torch.testing.assert_close(g(x), g(torch.from_numpy(x)), atol=0, rtol=0)
    torch.testing.assert_close(g(x=x), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.as_tensor(g.run_batch({"x": x})[0]), expected, atol=1e-6, rtol=1e-6)


def test_numpy_inputs_are_checked_like_tensors(onnx_graph):
    g, _ = onnx_graph
    with pytest.raises(rf.InputMismatchError, match="input 'x' has dtype torch.float64"):
        g(np.zeros((2, 4)))
    with pytest.raises(rf.InputMismatchError, match="input 'x' has size 5 in dimension 1"):
        g(np.zeros((2, 5), np.float32))
    with pytest.raises(rf.InputMismatchError, match="must be a torch.Tensor or a numpy array, got list"):
        g([[0.0] * 4])
