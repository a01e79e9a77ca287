"""PruneHeads / PruneChannels on ONNX-dialect graphs: tiny Llama and Qwen2 (grouped-query attention,
Qwen2 with q/k/v biases) and BERT (encoder) exported with rf.export_onnx and read back with rf.load,
plus one real-model check on MiniLM."""
import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

import rarefy as rf
from rarefy.ir.onnx_dialect import serialize
from rarefy.passes import PruneChannels, PruneHeads

import tiny_models

NAMES = ("llama", "qwen2", "bert")
_CACHE: dict = {}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (fx graph, onnx graph), each exported once per module (the exports are the slow part)."""
    def get(name):
        if name not in _CACHE:
            model, x = tiny_models.build(name)
            fx = rf.capture(model, x)
            path = rf.export_onnx(fx, tmp_path_factory.mktemp(name) / "model.onnx")
            _CACHE[name] = (fx, rf.load(path))
        return _CACHE[name]

    return get


def _batches(name, n, seed=2):
    return [tiny_models.example_inputs(name, 2, 8, seed=seed + i) for i in range(n)]


def _weight(graph, linear):
    site = next(s for s in graph.sites("linear") if s.name == linear)
    return tuple(site.info["weight_value"]().shape)


def _first_output(graph, batch):
    return graph.run_batch(batch)[0]


# the site names of block 0's q, k, gate/intermediate linears per architecture
Q = {"llama": "model.layers.0.self_attn.q_proj", "qwen2": "model.layers.0.self_attn.q_proj",
     "bert": "encoder.layer.0.attention.self.query"}
K = {"llama": "model.layers.0.self_attn.k_proj", "qwen2": "model.layers.0.self_attn.k_proj",
     "bert": "encoder.layer.0.attention.self.key"}
UP = {"llama": "model.layers.0.mlp.up_proj", "qwen2": "model.layers.0.mlp.up_proj",
      "bert": "encoder.layer.0.intermediate.dense"}
# 4 heads of 16 (GQA: 2 KV heads, so half = one KV group = 2 query heads + 1 KV head), 128 MLP channels
HALF_Q_K = {"llama": ((32, 64), (16, 64)), "qwen2": ((32, 64), (16, 64)), "bert": ((32, 64), (32, 64))}


@pytest.mark.parametrize("name,method", [("llama", "flap"), ("qwen2", "wanda"), ("bert", "magnitude")])
def test_onnx_prune_shrinks_checks_and_runs(exported, name, method):
    _, graph = exported(name)
    passes = [PruneHeads(0.5, method=method), PruneChannels(0.5, method=method)]
    out = rf.optimize(graph, passes, calibration=_batches(name, 3), progress=False)
    heads, channels = out.report.rows[1], out.report.rows[2]
    # 1. it fired: both blocks lose half their heads (GQA: one of two KV groups) and channels
    assert heads.stats["pruned_blocks"] == 2 and channels.stats["pruned_channels"] == 128
    assert heads.stats["bias_compensated"] == (2 if method == "flap" else 0)
    assert (_weight(out, Q[name]), _weight(out, K[name])) == HALF_Q_K[name]
    assert _weight(out, UP[name]) == (64, 64)
    assert out.parameter_bytes() < 0.75 * graph.parameter_bytes()
    assert out.meta["pruned_heads"]["model.layers.0" if name != "bert" else "encoder.layer.0"]["num_heads"] == 2
    # 2. within budget: half of every block of a random tiny model changes its output a lot; the
    # floor says the pruned graph still computes the same kind of function (a broken rewrite: ~0)
    assert heads.cosine > 0.5 and channels.cosine > 0.5
    # 3. still valid: onnx.checker (with shape inference: no stale shapes), ONNX Runtime through rf.compile
    onnx.checker.check_model(onnx.load_from_string(serialize(out.onnx)), full_check=True)
    batch = tiny_models.example_inputs(name, 3, 11, seed=9)
    y = rf.compile(out, "onnxruntime")(**batch)
    ref = _first_output(out, batch)
    got = y[0] if isinstance(y, (tuple, list)) else next(iter(y.values())) if isinstance(y, dict) else y
    torch.testing.assert_close(torch.as_tensor(got), ref, atol=1e-5, rtol=0)  # same graph, same runtime


@pytest.mark.parametrize("name", NAMES)
def test_onnx_zero_is_exact(exported, name):
    _, graph = exported(name)
    out = rf.optimize(graph, [PruneHeads(0.0), PruneChannels(count=0)], evaluation=_batches(name, 1),
                      progress=False)
    assert [row.status for row in out.report.rows[1:]] == ["unchanged", "unchanged"]
    assert all(row.max_abs_error <= 1e-5 for row in out.report.rows[1:])
    assert out.parameter_bytes() == graph.parameter_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_onnx_matches_fx_magnitude(exported, name):
    """Magnitude scores read the same weights in both dialects: the same units go, the outputs agree."""
    fx, graph = exported(name)
    passes = [PruneHeads(0.5), PruneChannels(0.25)]
    got = rf.optimize(graph, passes, evaluation=_batches(name, 1), progress=False)
    want = rf.optimize(fx, passes, evaluation=_batches(name, 1), progress=False)
    for row_onnx, row_fx in zip(got.report.rows[1:], want.report.rows[1:]):
        assert {b: d["removed"] for b, d in row_onnx.details.items()} == \
            {b: d["removed"] for b, d in row_fx.details.items()}
    batch = tiny_models.example_inputs(name, 3, 11, seed=9)
    fx_out = [t for t in torch.utils._pytree.tree_leaves(want(**batch)) if isinstance(t, torch.Tensor)][0]
    torch.testing.assert_close(_first_output(got, batch), fx_out, atol=1e-4, rtol=1e-4)  # ORT vs torch fp32
    # the same weight shapes (bytes differ a little: the exporter shares equal initializers, such as
    # zero biases, which the rewrite gives each linear back as its own sliced copy)
    for linear in (Q[name], K[name], UP[name]):
        assert _weight(got, linear) == tuple(want.fx.get_submodule(linear).weight.shape)
    assert got.parameter_bytes() < graph.parameter_bytes()


def test_onnx_gqa_removes_whole_kv_groups(exported):
    _, graph = exported("llama")
    out = rf.optimize(graph, [PruneHeads(count=1)], evaluation=_batches("llama", 1), progress=False)
    assert _weight(out, Q["llama"]) == (32, 64) and _weight(out, K["llama"]) == (16, 64)
    assert _weight(out, "model.layers.0.self_attn.o_proj") == (64, 32)
    assert out.meta["pruned_heads"]["model.layers.0"] == {"num_heads": 2, "num_kv_heads": 1}
    # repeat_kv's Expand [b, kv_heads, n_rep, s, d] and the merge back to [b, heads, s, d] were patched
    patched = [n for n in out.onnx.graph if n.name.endswith("_pruned_shape") or any(
        v is not None and v.name.endswith(".shape") for v in n.inputs)]
    assert any(n.op_type == "Concat" for n in patched)


def test_onnx_unreadable_shape_names_node_and_pass(exported):
    """A reshape whose target shape is computed by an op the analysis does not read raises, naming both."""
    _, graph = exported("bert")
    broken = graph.copy()
    g = broken.onnx.graph
    view = next(n for n in g if n.op_type == "Reshape" and n.inputs[0].name == "linear")  # query split
    zero = ir.Value(name="zero_shape", const_value=ir.tensor(np.zeros(4, np.int64), name="zero_shape"),
                    type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([4]))
    g.register_initializer(zero)
    add = ir.node("Add", [view.inputs[1], zero], name="opaque_shape")
    add.outputs[0].name = "opaque_shape_out"
    g.insert_before(view, add)
    view.replace_input_with(1, add.outputs[0])
    with pytest.raises(rf.UnsupportedError, match=rf"PruneHeads.*{view.name}"):
        rf.optimize(broken, [PruneHeads(0.5)], evaluation=_batches("bert", 1), progress=False)


@pytest.mark.real
def test_minilm_onnx_structured_pruning_runs_and_shrinks(tmp_path):
    from rarefy.eval.data import sentence_batches
    from rarefy.models import load_minilm

    model, tokenizer = load_minilm()
    batches = sentence_batches(tokenizer, "kjv", "evaluation", n_batches=1, batch_size=4, max_len=16)
    path = rf.export_onnx(rf.capture(model, batches[0]), tmp_path / "minilm.onnx")
    graph = rf.load(path)
    out = rf.optimize(graph, [PruneHeads(0.3), PruneChannels(0.3)], evaluation=batches, progress=False)
    heads, channels = out.report.rows[1], out.report.rows[2]
    assert heads.stats["pruned_heads"] == 6 * 3  # floor(0.3 * 12) heads in each of 6 layers
    assert channels.stats["pruned_channels"] == 6 * 460  # floor(0.3 * 1536)
    # per layer: 3 heads x 32 = 96 rows of q/k/v (+ biases) and columns of o; 460 rows of the
    # intermediate dense (+ bias) and columns of the output dense; fp32 (the embeddings stay: 47 of 91 MB)
    per_layer = 4 * 96 * 384 + 3 * 96 + 2 * 460 * 384 + 460
    assert graph.parameter_bytes() - out.parameter_bytes() == 6 * 4 * per_layer
    # magnitude, no calibration or fine-tuning: the embedding is still related to the original one
    assert channels.cosine > 0.5
    pruned = rf.export_onnx(out, tmp_path / "pruned" / "minilm.onnx")
    onnx.checker.check_model(str(pruned))
    assert pruned.stat().st_size < path.stat().st_size
    again = rf.load(pruned)
    torch.testing.assert_close(again.run_batch(batches[0])[0], out.run_batch(batches[0])[0], atol=1e-5, rtol=0)
