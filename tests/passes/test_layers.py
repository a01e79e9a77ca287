"""DropLayers: units are found on three architectures, bypasses are exact against the model
with the layer removed, every unit is scored and explained, and bad requests fail early."""
import copy

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import rarefy as rf
from rarefy.ir.errors import UnsupportedError
from rarefy.passes import DropLayers
from rarefy.passes.layers import find_units

SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=128)


def _llama():  # grouped-query attention, pre-norm
    return LlamaForCausalLM(LlamaConfig(**SMALL, intermediate_size=128, num_key_value_heads=2)).eval()


def _bert():  # encoder, post-norm
    return BertModel(BertConfig(**SMALL, intermediate_size=128)).eval()


def _opt():  # pre-norm decoder whose MLP runs on [B*S, H]
    return OPTForCausalLM(OPTConfig(**SMALL, ffn_dim=128, word_embed_proj_dim=64)).eval()


BUILD = {"llama": _llama, "bert": _bert, "opt": _opt}


def _batch(arch, batch=2, seq=16):
    ids = torch.randint(0, 128, (batch, seq))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if arch == "bert" else {"input_ids": ids}


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else next(iter(output.values()))


@pytest.mark.parametrize("arch", ["llama", "bert", "opt"])
@pytest.mark.parametrize("unit", ["block", "attention", "mlp"])
def test_every_block_has_one_unit_and_dropping_fires(arch, unit):
    model = BUILD[arch]()
    g = rf.capture(model, _batch(arch))
    units, notes = find_units(g, unit)
    assert len(units) == 4 and not notes
    out = rf.optimize(g, [DropLayers(count=1, unit=unit, metric="cosine")],
                      calibration=[_batch(arch) for _ in range(3)], progress=False)
    row = out.report.rows[-1]
    # 1. it fired: one unit gone, its linears with it; every unit scored, ranked and explained
    assert row.stats["dropped"] == 1 and row.stats["scored"] == 4
    dropped = [name for name, d in row.details.items() if isinstance(d, dict) and d["dropped"]]
    assert len(dropped) == 1
    assert all({"score", "rank", "why"} <= set(row.details[u.name]) for u in units)
    remaining = {s.name for s in out.sites("linear")}
    assert not any(name.startswith(dropped[0] + ".") for name in remaining)
    assert len(remaining) < len(g.sites("linear"))
    if arch == "bert" and unit != "block":
        assert any("post-norm" in note for note in row.notes)
    # 2. within budget: one of four random-weight units is a large change by design; the floor
    # (cosine > 0.3) only rules out garbage, exactness is checked against HF below
    assert row.cosine > 0.3
    assert row.param_bytes < out.report.rows[0].param_bytes


def _drop_llama_block(model, index):
    ref = copy.deepcopy(model)
    layers = [layer for i, layer in enumerate(ref.model.layers) if i != index]
    ref.model.layers = torch.nn.ModuleList(layers)
    ref.config.num_hidden_layers = len(layers)
    return ref


class _NoAttention(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


def test_llama_bypass_equals_the_model_without_that_unit():
    model = _llama()
    g = rf.capture(model, _batch("llama"))
    calibration = [_batch("llama") for _ in range(2)]
    x = _batch("llama", batch=3, seq=11)
    for unit in ("block", "attention"):
        out = rf.optimize(g, [DropLayers(count=1, unit=unit)], calibration=calibration, progress=False)
        dropped = [n for n, d in out.report.rows[-1].details.items() if isinstance(d, dict) and d["dropped"]][0]
        index = int(dropped.split(".")[2])
        if unit == "block":
            ref = _drop_llama_block(model, index)
        else:
            ref = copy.deepcopy(model)
            ref.model.layers[index].self_attn = _NoAttention()
        with torch.no_grad():
            expected = ref(**x, use_cache=False).logits
        # exact: a pre-norm residual bypass h + f(h) -> h is the model without f (fp32 atol)
        torch.testing.assert_close(out(**x).logits, expected, atol=1e-5, rtol=1e-5)


def test_count_zero_is_exact_and_unchanged():
    g = rf.capture(_llama(), _batch("llama"))
    out = rf.optimize(g, [DropLayers(count=0)], calibration=[_batch("llama") for _ in range(2)], progress=False)
    row = out.report.rows[-1]
    assert row.status == "unchanged" and row.max_abs_error == 0.0
    assert "count is 0: nothing to drop" in row.notes


def test_ppl_metric_scores_every_unit_by_loss_increase():
    g = rf.capture(_llama(), _batch("llama"))
    out = rf.optimize(g, [DropLayers(fraction=0.5, unit="mlp", metric="ppl")],
                      calibration=[_batch("llama") for _ in range(2)], progress=False)
    details = out.report.rows[-1].details
    assert details["metric"] == "mean next-token NLL increase (nats)"
    scores = sorted((d["score"], d["dropped"]) for n, d in details.items() if isinstance(d, dict))
    assert [dropped for _, dropped in scores] == [True, True, False, False]  # the two smallest go


@pytest.mark.parametrize("metric", ["cosine", "ppl"])
def test_iterative_drops_greedily_rescoring_after_each_removal(metric):
    model = _llama()
    g = rf.capture(model, _batch("llama"))
    calibration = [_batch("llama") for _ in range(2)]
    out = rf.optimize(g, [DropLayers(count=2, unit="attention", metric=metric, iterative=True)],
                      calibration=calibration, progress=False)
    details = out.report.rows[-1].details
    dropped = [n for n, d in details.items() if isinstance(d, dict) and d["dropped"]]
    # the greedy sequence, rebuilt by hand: the one-shot choice of one unit, then the one-shot
    # choice of one more on the graph that already lacks it
    first = rf.optimize(g, [DropLayers(count=1, unit="attention", metric=metric)],
                        calibration=calibration, progress=False)
    first_name = [n for n, d in first.report.rows[-1].details.items() if isinstance(d, dict) and d["dropped"]]
    second = rf.optimize(first, [DropLayers(count=1, unit="attention", metric=metric)],
                         calibration=calibration, progress=False)
    second_name = [n for n, d in second.report.rows[-1].details.items() if isinstance(d, dict) and d["dropped"]]
    assert sorted(dropped) == sorted(first_name + second_name)
    assert "iterative" in details["metric"] and all("round" in d["why"] for d in details.values()
                                                    if isinstance(d, dict))
    x = _batch("llama", batch=2, seq=9)
    torch.testing.assert_close(out(**x).logits, second(**x).logits, atol=1e-5, rtol=1e-5)
    if metric == "cosine":  # the second round's scores are those of the graph without the first unit
        rescored = second.report.rows[-1].details
        for name, d in rescored.items():
            if isinstance(d, dict) and not d["dropped"]:
                assert d["score"] == pytest.approx(details[name]["score"], rel=1e-6)


def test_bert_ppl_metric_says_it_uses_output_error():
    g = rf.capture(_bert(), _batch("bert"))
    out = rf.optimize(g, [DropLayers(count=1, unit="attention", metric="ppl")],
                      calibration=[_batch("bert") for _ in range(2)], progress=False)
    assert "not a causal LM" in out.report.rows[-1].details["metric"]


@pytest.mark.parametrize("arch,unit", [("llama", "attention"), ("bert", "mlp")])
def test_dropped_graph_exports_and_runs_in_onnxruntime(arch, unit, tmp_path):
    g = rf.capture(BUILD[arch](), _batch(arch))
    out = rf.optimize(g, [DropLayers(count=2, unit=unit)], calibration=[_batch(arch) for _ in range(2)],
                      progress=False)
    rf.export_onnx(out, tmp_path / "dropped.onnx")  # runs onnx.checker
    ort = rf.compile(out, "onnxruntime", optimize=False)
    x = _batch(arch, batch=3, seq=9)
    torch.testing.assert_close(_first(ort(**x)), _first(out(**x)), atol=1e-5, rtol=1e-5)


def test_bad_requests_fail_before_work():
    with pytest.raises(UnsupportedError, match="exactly one of count= or fraction="):
        DropLayers()
    with pytest.raises(UnsupportedError, match="exactly one of count= or fraction="):
        DropLayers(count=1, fraction=0.25)
    with pytest.raises(UnsupportedError, match="unknown unit"):
        DropLayers(count=1, unit="head")
    with pytest.raises(UnsupportedError, match="unknown metric"):
        DropLayers(count=1, metric="random")
    g = rf.capture(_llama(), _batch("llama"))
    with pytest.raises(UnsupportedError, match="would remove every one"):
        rf.optimize(g, [DropLayers(count=4)], calibration=[_batch("llama")] * 2, progress=False)


@pytest.mark.real
def test_minilm_drop_one_attention_sublayer_keeps_embeddings_close():
    from rarefy.eval import sentence_batches
    from rarefy.models import load_minilm, mean_pool_embedding

    model, tok = load_minilm()
    calibration = sentence_batches(tok, "pydoc", "calibration", n_batches=1, batch_size=8)
    evaluation = sentence_batches(tok, "kjv", "evaluation", n_batches=1, batch_size=8)
    g = rf.capture(model, calibration[0])
    out = rf.optimize(g, [DropLayers(count=1, unit="attention")], calibration=calibration, evaluation=evaluation,
                      progress=False)
    batch = evaluation[0]
    ref = mean_pool_embedding(g(**batch)[0], batch["attention_mask"])
    new = mean_pool_embedding(out(**batch)[0], batch["attention_mask"])
    cos = torch.nn.functional.cosine_similarity(ref, new).mean()
    # one of six post-norm attention sublayers (with its LayerNorm): measured ~0.9; 0.7 catches a wrong bypass
    assert cos > 0.7
