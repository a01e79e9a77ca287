"""PruneChannels / PruneHeads on tiny Llama (GQA), BERT (encoder) and OPT, plus quick real-model checks."""
import onnx
import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import rarefy as rf
from rarefy.eval.metrics import cosine
from rarefy.passes import PruneChannels, PruneHeads

VOCAB = 128


def _llama():
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))


def _llama_eager():
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        attn_implementation="eager"))


def _bert():
    return BertModel(BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                vocab_size=VOCAB))


def _opt():
    return OPTForCausalLM(OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=VOCAB, word_embed_proj_dim=64))


def _inputs(model, batch=2, seq=8):
    ids = torch.randint(0, VOCAB, (batch, seq))
    if isinstance(model, BertModel):
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"input_ids": ids}


MODELS = {"llama_gqa": _llama, "llama_gqa_eager": _llama_eager, "bert": _bert, "opt": _opt}
# (removed per block) params: Llama GQA: one KV group = q/o 32 cols/rows x 64 + k/v 16 rows x 64;
# 64 MLP channels = 3 x 64 x 64. BERT/OPT: 2 heads = 4 x 32 x 64 + 3 x 32 biases; 64 channels = 2 x 64 x 64 + 64.
EXPECTED_REMOVED = {
    "llama_gqa": 2 * (2 * 32 * 64 + 2 * 16 * 64) + 2 * (3 * 64 * 64),
    "llama_gqa_eager": 2 * (2 * 32 * 64 + 2 * 16 * 64) + 2 * (3 * 64 * 64),
    "bert": 2 * (4 * 32 * 64 + 3 * 32) + 2 * (2 * 64 * 64 + 64),
    "opt": 2 * (4 * 32 * 64 + 3 * 32) + 2 * (2 * 64 * 64 + 64),
}


def _capture(name):
    model = MODELS[name]().eval()
    return rf.capture(model, _inputs(model)), model


def _calibration(model, n=3):
    return [_inputs(model) for _ in range(n)]


def _flat(out):
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _param_count(graph):
    return graph.parameter_bytes() // 4


@pytest.mark.parametrize("name", list(MODELS))
def test_fraction_zero_is_exact(name):
    graph, model = _capture(name)
    out = rf.optimize(graph, [PruneHeads(0.0), PruneChannels(0.0)], calibration=_calibration(model), progress=False)
    assert all(row.status == "unchanged" for row in out.report.rows[1:])
    assert any("rounds to 0" in note for note in out.report.rows[1].notes)
    x = _inputs(model, 3, 11)
    for a, b in zip(_flat(graph(**x)), _flat(out(**x))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # untouched graph: fp32 bit-for-bit up to copies


def _prune_half(name, method):
    graph, model = _capture(name)
    passes = [PruneHeads(0.5, method=method), PruneChannels(0.5, method=method)]
    return graph, model, rf.optimize(graph, passes, calibration=_calibration(model), progress=False)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "flap"])
def test_methods_fire_and_shrink(method):
    graph, model, out = _prune_half("llama_gqa", method)
    heads, channels = out.report.rows[1], out.report.rows[2]
    # 1. it fired: 2 blocks x half the units each (one of two KV groups, 64 of 128 channels)
    assert heads.stats == {"pruned_heads": 2, "pruned_blocks": 2, "bias_compensated": 2 if method == "flap" else 0}
    assert channels.stats["pruned_channels"] == 128
    # flap adds a bias to consumers that had none (Llama: o_proj and down_proj, 64 each per block)
    assert _param_count(graph) - _param_count(out) == EXPECTED_REMOVED["llama_gqa"] - (256 if method == "flap" else 0)
    # 2. within budget: random tiny models have no redundancy, so half of every block changes the
    # output a lot; the floor only says the pruned model still computes the same kind of function.
    assert heads.cosine > 0.5 and channels.cosine > 0.5


# one method per architecture keeps the (slow) ONNX exports to four
@pytest.mark.parametrize("name,method", [("llama_gqa", "flap"), ("llama_gqa_eager", "wanda"), ("bert", "magnitude"),
                                         ("opt", "flap")])
def test_pruned_graph_exports_and_runs_in_ort(name, method, tmp_path):
    graph, model, out = _prune_half(name, method)
    assert _param_count(graph) - _param_count(out) == EXPECTED_REMOVED[name] - (
        256 if method == "flap" and name.startswith("llama") else 0)
    assert out.report.rows[1].cosine > 0.5 and out.report.rows[2].cosine > 0.5  # as above
    # still valid: exports, passes onnx.checker, round-trips rf.load, runs in ORT with optimisations off
    path = rf.export_onnx(out, tmp_path / "pruned.onnx")
    onnx.checker.check_model(str(path))
    loaded = rf.load(path)
    assert loaded.parameter_bytes() < graph.parameter_bytes()
    x = _inputs(model, 3, 11)
    for a, b in zip(_flat(out(**x)), loaded.run_batch(x)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)  # fp32 export: ORT matches torch to ~1e-6


def test_gqa_removes_whole_kv_groups():
    graph, model = _capture("llama_gqa")
    out = rf.optimize(graph, [PruneHeads(count=1)], calibration=_calibration(model), progress=False)
    q = out.fx.get_submodule("model.layers.0.self_attn.q_proj").weight
    k = out.fx.get_submodule("model.layers.0.self_attn.k_proj").weight
    assert q.shape == (32, 64) and k.shape == (16, 64)  # 2 query heads of 16 + their 1 KV head
    assert out.meta["pruned_heads"]["model.layers.0"] == {"num_heads": 2, "num_kv_heads": 1}
    heads = out.meta["pruned_heads"]["model.layers.0"]
    assert heads["num_heads"] % heads["num_kv_heads"] == 0


def test_targets_and_notes_say_why():
    graph, model = _capture("bert")
    out = rf.optimize(graph, [PruneChannels(0.25, targets="encoder.layer.1")], calibration=_calibration(model),
                      progress=False)
    row = out.report.rows[1]
    assert row.stats["pruned_blocks"] == 1
    assert any("encoder.layer.0: skipped (not matched by targets)" in n for n in row.notes)
    assert any("residual hidden stream" in n for n in row.notes)  # why the hidden size was left alone
    assert out.fx.get_submodule("encoder.layer.0.intermediate.dense").weight.shape == (128, 64)
    assert out.fx.get_submodule("encoder.layer.1.intermediate.dense").weight.shape == (96, 64)
    assert set(row.details["encoder.layer.1"]) == {"units", "removed", "scores"}
    assert row.spec == {"pass": "PruneChannels", "fraction": 0.25, "targets": "encoder.layer.1"}
    assert rf.passes.Pass.from_spec(row.spec).spec() == row.spec  # recipes round-trip


def test_bad_requests_get_clear_errors():
    graph, model = _capture("bert")
    with pytest.raises(rf.UnsupportedError, match="cannot remove 5 heads from encoder.layer.0, which has 4"):
        rf.optimize(graph, [PruneHeads(count=5)], calibration=_calibration(model), progress=False)
    with pytest.raises(rf.UnsupportedError, match="fraction=1.0"):
        PruneHeads(1.0)
    with pytest.raises(rf.UnsupportedError, match="unknown method"):
        PruneChannels(0.2, method="taylor")
    with pytest.raises(rf.RarefyError, match="needs calibration"):
        rf.optimize(graph, [PruneChannels(0.2, method="flap")], progress=False)


def test_flap_beats_magnitude_on_planted_redundancy():
    """Channels with large weights but a constant input are worthless to magnitude's eye-test and free
    to FLAP: their (constant) contribution moves into the bias. Magnitude removes real channels instead."""
    graph, model = _capture("llama_gqa")
    gm = graph.fx
    for i in range(2):
        mlp = gm.get_submodule(f"model.layers.{i}.mlp")
        with torch.no_grad():
            mlp.gate_proj.weight[:32] = 0.0  # silu(0 x) * (0 x) = 0: a constant channel
            mlp.up_proj.weight[:32] = 0.0
            mlp.down_proj.weight[:, :32] *= 50.0  # big columns, but their input is constant (0)
    calib = _calibration(model, 4)
    evaluation = _calibration(model, 2)
    cos = {}
    for method in ("magnitude", "flap"):
        out = rf.optimize(graph, [PruneChannels(0.25, method=method)], calibration=calib, evaluation=evaluation,
                          progress=False)
        cos[method] = out.report.rows[1].cosine
    assert cos["flap"] > 0.999999  # flap removes exactly the dead channels: the function is unchanged
    assert cos["magnitude"] < cos["flap"]


@pytest.mark.real
def test_minilm_prune_keeps_embedding_quality():
    from rarefy.eval.data import sentence_batches
    from rarefy.models import load_minilm, mean_pool_embedding

    model, tokenizer = load_minilm()
    calib = sentence_batches(tokenizer, "pydoc", "calibration", n_batches=2, batch_size=8, max_len=32)
    evaluation = sentence_batches(tokenizer, "kjv", "evaluation", n_batches=1, batch_size=8, max_len=32)
    graph = rf.capture(model, calib[0])
    out = rf.optimize(graph, [PruneHeads(1 / 6, method="flap"), PruneChannels(1 / 6, method="flap")],
                      calibration=calib, evaluation=evaluation, progress=False)
    assert out.report.rows[1].stats["pruned_heads"] == 12  # 2 of 12 heads in each of 6 layers
    batch = evaluation[0]
    ref = mean_pool_embedding(graph(**batch)[0], batch["attention_mask"])
    got = mean_pool_embedding(out(**batch)[0], batch["attention_mask"])
    # a sixth of every block's heads and channels, no fine-tuning: measured ~0.9 here (benchmarks/
    # results/prune_structured.md has the curve); 0.8 catches a broken rewrite (~0.1) with margin
    assert float(cosine(ref, got)) > 0.8
    assert out.parameter_bytes() < graph.parameter_bytes()
