"""CompressKV: KIVI quantization and H2O / SnapKV / StreamingLLM eviction of a decode step's cache."""
import onnx
import pytest
import torch
import transformers as tf

import rarefy as rf
from rarefy.eval.metrics import sqnr_db
from rarefy.ir.decoder import initial_state, teacher_forced_logits
from rarefy.passes import CompressKV

CAPACITY = 64


def tiny_llama(layers=2):
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128)
    return tf.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def step():
    return rf.capture_decoder(tiny_llama(), max_cache_len=CAPACITY)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def dense_logits(step, ids):
    return teacher_forced_logits(step, ids)


@pytest.mark.parametrize("bits, G, R, floor_db", [(4, 8, 8, 25.0), (2, 8, 8, 10.0), (4, 16, 0, 25.0)])
def test_kivi_shrinks_the_cache_within_budget(step, ids, dense_logits, bits, G, R, floor_db):
    small = rf.optimize(step, [CompressKV("quantize", bits=bits, group_size=G, residual=R)],
                        evaluation=[ids[:, :20]], progress=False)
    record = small.report.rows[-1]
    # it fired: every layer swapped for the packed cache ops, state stored as uint8 codes
    assert record.stats["quantize_layers"] == 2
    ops = {n.target for n in small.fx.graph.nodes if n.op == "call_function"}
    assert torch.ops.rarefy.kivi_attention.default in ops and torch.ops.rarefy.cache_attention.default not in ops
    assert small.signature.dtypes[small.signature.names.index("k_codes_0")] == torch.uint8
    assert ("v_ring_0" in small.signature.names) == (R > 0)  # R = 0: values only as codes
    # the bytes really shrink; the pass docstring's formula per layer and kv head (C=64, Dh=16):
    # codes 2 * C*Dh*bits/8, fp16 scale+zero 2 * 2 * (C/G*Dh keys + C*Dh/G values), fp16 ring(s) (R+G)*Dh*2
    # (keys; values too when R > 0), vs fp32 2 * C*Dh*4
    rings = 2 if R else 1
    expected = (2 * 64 * 16 * bits / 8 + 2 * 2 * 2 * 64 * 16 / G + rings * (R + G) * 16 * 2) / (2 * 64 * 16 * 4)
    assert small.cache_bytes() / step.cache_bytes() == pytest.approx(expected)
    # within budget: 48 tokens, 24-40 of them quantized; floors are ~10 dB under what this tiny
    # random model gives (int4 ~35 dB, int2 ~20 dB): they catch layout bugs (garbage is < 0 dB)
    logits = teacher_forced_logits(small, ids)
    assert sqnr_db(dense_logits, logits) > floor_db
    assert step.cache_bytes() == 2 * 2 * 2 * CAPACITY * 16 * 4  # the input graph is left unchanged


def test_kivi_write_stores_kivi_codes():
    """After L tokens the stored key groups are exactly kivi.quantize_keys of the first Q(L) keys."""
    from rarefy.kernels import kivi, kv_cache

    torch.manual_seed(0)
    B, H, C, D, G, R, bits = 1, 2, 32, 16, 8, 8, 4
    keys, values = torch.randn(B, H, 27, D), torch.randn(B, H, 27, D)
    state = [torch.zeros(B, H, C * bits // 8, D, dtype=torch.uint8), torch.zeros(B, H, C // G, D).half(),
             torch.zeros(B, H, C // G, D).half(), torch.zeros(B, H, C, D * bits // 8, dtype=torch.uint8),
             torch.zeros(B, H, C, D // G).half(), torch.zeros(B, H, C, D // G).half(),
             torch.zeros(B, H, R + G, D).half(), torch.zeros(B, H, R + G, D).half()]
    for start, stop in [(0, 13), (13, 14), (14, 27)]:  # a prefill, a decode step, a long chunk
        state = list(kv_cache.kivi_write(*state, keys[:, :, start:stop], values[:, :, start:stop],
                                         torch.arange(start, stop), bits, G, R))
    q = int(kv_cache.quantized_count(torch.tensor(27), R, G))
    assert q == 16
    # positions written before the last chunk were read back from the fp16 ring
    expected = torch.cat([keys[:, :, :14].half().float(), keys[:, :, 14:q]], dim=2)
    codes, scale, zero = kivi.quantize_keys(expected, bits, G)
    assert torch.equal(state[0][:, :, :q * bits // 8], codes)
    assert torch.equal(state[1][:, :, :q // G], scale)
    v_codes, _, _ = kivi.quantize_values(values, bits, G)
    assert torch.equal(state[3][:, :, :27], v_codes)


@pytest.mark.parametrize("method", ["h2o", "snapkv", "streaming"])
def test_budget_covering_the_context_is_exact(step, ids, dense_logits, method):
    full = rf.optimize(step, [CompressKV(method, token_budget=CAPACITY)], progress=False)
    assert full.report.rows[-1].stats[f"{method}_layers"] == 2
    # exact: nothing is evicted, attention over the same set in another slot order (fp32 reordering)
    torch.testing.assert_close(teacher_forced_logits(full, ids), dense_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(teacher_forced_logits(full, ids, prefill=30), dense_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["h2o", "snapkv", "streaming"])
def test_eviction_keeps_the_budget(step, ids, dense_logits, method):
    small = rf.optimize(step, [CompressKV(method, token_budget=16)], progress=False)
    assert small.cache_bytes() < step.cache_bytes() / 3
    assert small.meta["decoder"]["max_tokens"] is None  # an evicting cache never fills up
    # runs past its budget; tokens differ from the dense cache but stay finite and correlated
    logits = teacher_forced_logits(small, ids, prefill=24)
    assert torch.isfinite(logits).all()
    assert 0.0 < sqnr_db(dense_logits, logits) < 60.0
    # the kept slots: recent window always, plus sinks for streaming
    out = small(ids[:, :40], torch.arange(40), *initial_state(small, 2))
    kept = out[small.signature.names.index("slot_pos_0") - 1]
    window = small.sites("kv_cache")[0].info["window"]
    for row in kept.reshape(-1, 16):
        assert set(range(40 - window, 40)) <= set(row.tolist())
        if method == "streaming":
            assert set(range(4)) <= set(row.tolist())


@pytest.mark.parametrize("method, budget, bits, floor_db", [("h2o", CAPACITY, 4, 25.0), ("streaming", 16, 2, 5.0)])
def test_eviction_and_quantization_in_one_pass(step, ids, dense_logits, method, budget, bits, floor_db):
    small = rf.optimize(step, [CompressKV(method, token_budget=budget, bits=bits, group_size=8)], progress=False)
    # it fired: per-token codes, slot positions and scores as state
    assert small.sites("kv_cache")[0].info["method"] == f"{method}+int{bits}"
    ops = {n.target for n in small.fx.graph.nodes if n.op == "call_function"}
    assert torch.ops.rarefy.evict_quant_write.default in ops
    # bytes: codes + fp16 scale/zero per 8 channels + int64 position + fp32 score, per slot and kv head
    per_slot = 2 * (16 * bits / 8 + 2 * 2 * 2) + 8 + 4
    assert small.cache_bytes() == 2 * 2 * budget * per_slot  # 2 layers x 2 kv heads
    # floors ~10 dB under this tiny model (int4 full budget ~38 dB; int2 with 16 of 48 slots ~12 dB)
    assert sqnr_db(dense_logits, teacher_forced_logits(small, ids, prefill=20)) > floor_db


def test_quantize_after_eviction_skips_with_reason(step):
    out = rf.optimize(step, [CompressKV("h2o", token_budget=32), CompressKV("quantize", bits=4, group_size=8)],
                      progress=False)
    last = out.report.rows[-1]
    assert last.stats["skipped_already_compressed"] == 2 and "already compressed by h2o" in last.notes[0]


def test_bad_requests_fail_before_any_work(step):
    plain = rf.capture(tiny_llama(), {"input_ids": torch.zeros(2, 4, dtype=torch.long)})
    with pytest.raises(rf.RarefyError, match="capture_decoder"):
        rf.optimize(plain, [CompressKV("quantize", bits=4)], progress=False)
    with pytest.raises(rf.RarefyError, match="smaller than sinks"):
        CompressKV("streaming", token_budget=8, sinks=4, window=8)
    with pytest.raises(rf.RarefyError, match="larger than the cache"):
        rf.optimize(step, [CompressKV("h2o", token_budget=CAPACITY + 1)], progress=False)
    with pytest.raises(rf.RarefyError, match="bits"):
        CompressKV("quantize", bits=3)
    with pytest.raises(rf.RarefyError, match="unknown method"):
        CompressKV("pyramid", token_budget=8)
    with pytest.raises(rf.RarefyError, match="token_budget="):
        CompressKV("h2o")


def test_the_token_count_is_token_budget_and_budget_means_the_verification_budget():
    # budget= is the verification budget on every pass; the old spelling of the token count says the new one
    with pytest.raises(rf.RecipeError, match=r"CompressKV: the token count per layer is token_budget=32 now"):
        CompressKV("h2o", budget=32)
    with pytest.raises(rf.RecipeError, match=r"token_budget=8"):
        rf.Recipe.from_dict({"passes": [{"pass": "CompressKV", "method": "snapkv", "budget": 8}]})
    kv = CompressKV("h2o", token_budget=32, budget={"min_sqnr_db": 10})
    assert kv.token_budget == 32 and kv.budget == {"min_sqnr_db": 10}
    assert kv.spec() == {"pass": "CompressKV", "method": "h2o", "token_budget": 32, "budget": {"min_sqnr_db": 10}}


def test_compressed_step_exports_and_runs_in_onnxruntime(tmp_path):
    # one export covers the op families (targets= selects): KIVI with an fp window and two value groups
    # per token on layer 0, KIVI without a window (values from their codes) on layer 1,
    # SnapKV + int4 on layer 2
    passes = [CompressKV("quantize", bits=4, group_size=8, residual=8, targets="*layers.0.*"),
              CompressKV("quantize", bits=2, group_size=8, residual=0, targets="*layers.1.*"),
              CompressKV("snapkv", token_budget=12, window=4, bits=4, group_size=8, targets="*layers.2.*")]
    small = rf.optimize(rf.capture_decoder(tiny_llama(layers=3), max_cache_len=32), passes, progress=False)
    assert [r.stats.get("skipped_by_selector") for r in small.report.rows[1:]] == [2, 2, 2]
    path = rf.export_onnx(small, tmp_path / "step.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == small.signature.names  # the cache is explicit I/O
    ort = rf.compile(small, "onnxruntime", optimize=False)
    ids = torch.randint(0, 128, (2, 20))
    torch.testing.assert_close(teacher_forced_logits(ort, ids, graph=small, prefill=9),
                               teacher_forced_logits(small, ids, prefill=9), atol=1e-4, rtol=0)
    assert torch.equal(rf.generate(small, ids[:, :4], 6, step=ort), rf.generate(small, ids[:, :4], 6))


def test_kivi_group_sizes_may_differ_between_layers_of_one_onnxruntime_session():
    # a write quantizes ceil(T / G) candidate key groups, a count that differs between these layers; it once
    # came out of the export as a static 1 (its value at the traced T = 3), and ONNX Runtime shared
    # one buffer between the layers: "Shape mismatch attempting to re-use buffer" on any chunk of > 7 tokens
    passes = [CompressKV("quantize", bits=4, group_size=8, residual=0, targets="*layers.0.*"),
              CompressKV("quantize", bits=4, group_size=16, residual=0, targets="*layers.1.*")]
    small = rf.optimize(rf.capture_decoder(tiny_llama(), max_cache_len=32), passes, progress=False)
    assert [(e["method"], e["group_size"]) for e in small.meta["kv_cache"]] == [("kivi4", 8), ("kivi4", 16)]
    ort = rf.compile(small, "onnxruntime", optimize=False)
    onnx.checker.check_model(ort.model_proto)
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(teacher_forced_logits(ort, ids, graph=small, prefill=9, chunk=4),
                               teacher_forced_logits(small, ids, prefill=9, chunk=4), atol=1e-4, rtol=0)
