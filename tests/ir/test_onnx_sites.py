"""Sites of ONNX-dialect graphs: the same names and weights as the FX dialect's."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import rarefy as rf
from rarefy.ir.fx_utils import get_tensor

from tiny_models import VOCAB, build


def tiny(arch: str) -> torch.nn.Module:
    return build(arch)[0]


@pytest.fixture(scope="module", params=["llama", "bert"])
def both_dialects(request, tmp_path_factory):
    torch.manual_seed(0)
    graph = rf.capture(tiny(request.param), {"input_ids": torch.randint(0, VOCAB, (2, 8))})
    path = rf.export_onnx(graph, tmp_path_factory.mktemp(request.param) / "model.onnx")
    return request.param, graph, rf.load(path)


def test_linear_sites_match_the_fx_dialect(both_dialects):
    arch, fx_graph, onnx_graph = both_dialects
    fx_sites = {s.name: s for s in fx_graph.sites("linear")}
    onnx_sites = {s.name: s for s in onnx_graph.sites("linear")}
    assert set(onnx_sites) == set(fx_sites)  # names from pkg.torch.onnx.name_scopes
    for name, site in onnx_sites.items():
        weight = get_tensor(fx_graph.fx, fx_sites[name].tensors["weight"]).detach()
        assert site.shapes["weight"] == tuple(weight.shape)
        torch.testing.assert_close(site.info["weight_value"](), weight, atol=0, rtol=0)
        fx_bias = fx_sites[name].tensors.get("bias")
        if fx_bias is not None and get_tensor(fx_graph.fx, fx_bias).abs().sum() > 0:  # the exporter drops zero biases
            assert "bias" in site.tensors


def test_block_and_attention_sites(both_dialects):
    arch, fx_graph, onnx_graph = both_dialects
    blocks = onnx_graph.sites("block")
    assert [b.name for b in blocks] == [b.name for b in fx_graph.sites("block")]
    assert blocks[0].info["linears"] == fx_graph.sites("block")[0].info["linears"]
    attention = onnx_graph.sites("attention")[0]
    assert attention.name == fx_graph.sites("attention")[0].name
    assert set(attention.tensors) == {"q", "k", "v", "o"}


def test_gemm_and_transposed_weights(tmp_path):
    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    w2 = rng.standard_normal((3, 6)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),  # weight [N, K]
        helper.make_node("Transpose", ["w2"], ["w2_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "w2_t"], ["y"], name="fc2"),  # MatMul through a Transpose
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))])
    path = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    sites = rf.load(path).sites("linear")
    assert [s.name for s in sites] == ["w1", "w2"]  # no name scopes: the weight initializer's name
    assert sites[0].tensors == {"weight": "w1", "bias": "b1"} and "bias" not in sites[1].tensors
    torch.testing.assert_close(sites[0].info["weight_value"](), torch.from_numpy(w1))
    torch.testing.assert_close(sites[1].info["weight_value"](), torch.from_numpy(w2))
    out = rf.optimize(rf.load(path), [rf.passes.QuantizeWeights(bits=8)], evaluation=[(torch.randn(2, 4),)],
                      progress=False)
    assert out.report.rows[-1].stats["quantized_linear"] == 2
    assert {n.op_type for n in out.onnx.graph} == {"MatMulNBits"}  # Gemm, Transpose and MatMul replaced
    assert out.report.rows[-1].sqnr_db > 35  # 8-bit per-channel on a 6x4 weight
