"""Capture on every architecture family, exactness of the empty pipeline and of
EliminateDeadCode through torch and ONNX Runtime (issue: foundation, points 2, 3, 7)."""
import functools

import pytest
import torch
from torch.utils._pytree import tree_leaves

import rarefy as rf
import tiny_models as tm

EXACT_ATOL = 1e-5  # fp32: exact rewrites and a faithful ONNX export agree to rounding noise


@functools.lru_cache(maxsize=None)
def _captured(name):
    model, example = tm.build(name)
    return model, rf.capture(model, example)


def _max_err(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(tree_leaves(a), tree_leaves(b)) if x.is_floating_point())


@pytest.mark.parametrize("name", tm.ALL)
def test_capture_is_exact_and_dynamic_on_every_architecture(name):
    model, g = _captured(name)
    other = tm.example_inputs(name, batch=3, seq=5)  # another batch and sequence length than captured
    with torch.no_grad():
        reference = model(**other)
    assert _max_err(g(**other), reference) <= EXACT_ATOL
    empty = rf.optimize(g, [], progress=False)
    assert _max_err(empty(**other), reference) <= EXACT_ATOL
    out = rf.optimize(g, [rf.passes.EliminateDeadCode()], progress=False)
    assert out.report.rows[-1].max_abs_error <= EXACT_ATOL  # verified by the pipeline itself
    assert out.report.rows[-1].stats["identity_ops"] + out.report.rows[-1].stats["dead_nodes"] > 0
    assert _max_err(out(**other), reference) <= EXACT_ATOL
    for graph in (empty, out):
        ort = rf.compile(graph, "onnxruntime", optimize=False)
        assert _max_err(ort(**other), reference) <= EXACT_ATOL


@pytest.mark.parametrize("name", tm.ALL)
def test_sites_name_blocks_attention_and_linears(name):
    model, g = _captured(name)
    blocks = g.sites("block")
    assert len(blocks) == model.config.num_hidden_layers
    for block in blocks:
        assert block.info["attention"] is not None and block.info["mlp_linears"]
        assert block.info["hidden_input"] is not None
    attention = g.sites("attention")
    assert len(attention) == len(blocks)
    roles = set(attention[0].tensors)
    assert roles >= {"q", "k", "v", "o"} or roles >= {"qkv", "o"}
    module_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    linear_names = {s.name for s in g.sites("linear")}
    assert module_names <= linear_names | {"lm_head"} or name == "gpt2"
    assert attention[0].info["num_heads"] == 4


def test_capture_leaves_the_users_model_as_it_was():
    model, example = tm.build("llama")
    model.train()
    model.config.use_cache = True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = rf.capture(model, example)
    rf.optimize(g, [rf.passes.QuantizeWeights(bits=4, group_size=16)], progress=False)
    assert model.training and model.config.use_cache is True
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gpt2_conv1d_becomes_linear_sites():
    model, example = tm.build("gpt2")
    g = rf.capture(model, example)
    names = {s.name for s in g.sites("linear")}
    assert "transformer.h.0.attn.c_attn" in names and "transformer.h.1.mlp.c_proj" in names
    site = next(s for s in g.sites("linear") if s.name == "transformer.h.0.attn.c_attn")
    assert site.shapes["weight"] == (192, 64)  # [out, in] like nn.Linear


def test_plain_module_with_positional_inputs():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    g = rf.capture(model, (torch.randn(1, 16),))  # batch 1 is widened so the batch stays dynamic
    x = torch.randn(5, 16)
    assert torch.allclose(g(x), model(x), atol=EXACT_ATOL)
    assert [s.name for s in g.sites("linear")] == ["0", "2"]
    assert g.sites("block") == []


def test_capture_failure_names_the_module_and_reason():
    class Bad(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow cannot be exported
                return x * 2
            return x

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Bad()

        def forward(self, x):
            return self.inner(x) + 1

    with pytest.raises(rf.CaptureError, match=r"module 'inner' \(Bad\)"):
        rf.capture(Outer(), (torch.randn(2, 3),))


def test_load_reads_an_exported_model(tmp_path):
    model, example = tm.build("bert")
    g = rf.capture(model, example)
    path = rf.export_onnx(g, tmp_path / "bert.onnx")
    loaded = rf.load(path)
    assert loaded.dialect == "onnx"
    assert loaded.signature.names == ["input_ids", "attention_mask"]
    out = loaded(**example)
    assert _max_err(out[0], g(**example).last_hidden_state) <= EXACT_ATOL
    assert loaded.parameter_bytes() > 0
