"""Every weight-side pass family on the decoder-with-past graph of a tiny Llama: the exported
artifact, run in ONNX Runtime over a prefill and 8 decode steps (each step reading the cache the
previous one returned), gives the logits the rarefy graph gives over the full sequence."""
import numpy as np
import onnx
import pytest
import torch

import rarefy as rf
import tiny_models
from rarefy.backends.onnx_decoder import decoder_proto
from rarefy.ir.causal_lm import without_unread_caches
from rarefy.ir.onnx_dialect import make_session

PREFILL, STEPS = 8, 8
P = rf.passes

FAMILIES = {
    "fp32": [P.EliminateDeadCode()],
    "gptq_int4": [P.QuantizeWeights(bits=4, group_size=32, method="gptq")],
    "split_outliers_awq_int4": [P.SplitOutliers(ratio=2.0), P.QuantizeWeights(bits=4, group_size=32, method="awq")],
    "mixed_precision_2_to_8": [P.MixedPrecision(avg_bits=3.0, group_size=32)],
    "smoothquant_w8a8": [P.SmoothQuant(), P.QuantizeActivations(granularity="token")],
    "channels_then_sparsity": [P.PruneChannels(fraction=0.25), P.Sparsify(sparsity=0.5, method="wanda")],
    "drop_attention": [P.DropLayers(count=1, unit="attention")],
    "prune_heads_gqa": [P.PruneHeads(fraction=0.5)],
}


@pytest.fixture(scope="module")
def decoder():
    model, _ = tiny_models.build("llama")
    return rf.capture_causal_lm(model)


def batches(n: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, tiny_models.VOCAB, (2, PREFILL + STEPS), generator=gen)} for _ in range(n)]


def decode_in_ort(graph, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of ``ids`` through the exported artifact: one prefill call, then one
    token per call with the presents fed back as the past."""
    proto = decoder_proto(graph)
    onnx.checker.check_model(proto)
    session = make_session(proto.SerializeToString())
    inputs = [i.name for i in session.get_inputs()]
    past_names = inputs[3:]
    heads, head_dim = graph.meta["causal_lm"]["num_kv_heads"], graph.meta["causal_lm"]["head_dim"]
    batch = ids.shape[0]
    past = [np.zeros((batch, heads, 0, head_dim), np.float32) for _ in past_names]
    logits, start = [], 0
    for stop in [PREFILL] + list(range(PREFILL + 1, ids.shape[1] + 1)):
        feeds = {"input_ids": ids[:, start:stop].numpy(), "attention_mask": np.ones((batch, stop), np.int64),
                 "position_ids": np.tile(np.arange(start, stop), (batch, 1))}
        out = session.run(None, {**feeds, **dict(zip(past_names, past))})
        logits.append(out[0])
        past, start = out[1:], stop
    return torch.from_numpy(np.concatenate(logits, axis=1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoder_artifact_matches_the_full_sequence_graph(decoder, family):
    out = rf.optimize(decoder, FAMILIES[family], calibration=batches(3, 1), evaluation=batches(1, 2),
                      progress=False)
    assert all(row.status == "applied" for row in out.report.rows[1:]), out.report.table()  # it fired
    ids = batches(1, 3)[0]["input_ids"]
    full = out(input_ids=ids)[0]
    decoded = decode_in_ort(out, ids)
    # same weights and codes on both sides: only ONNX Runtime's float rounding differs
    assert ((decoded - full).abs().max() / full.abs().max()).item() <= 1e-4


def test_a_dropped_attention_sublayer_has_no_cache(decoder):
    out = rf.optimize(decoder, [P.DropLayers(count=1, unit="attention")], calibration=batches(2, 1),
                      evaluation=batches(1, 2), progress=False)
    dropped = out.report.rows[1].stats["dropped"]
    assert dropped == 1
    trimmed = without_unread_caches(out)
    assert trimmed.meta["causal_lm"]["num_layers"] == 1 and len(trimmed.meta["causal_lm"]["cache_layers"]) == 1
    proto = decoder_proto(out)
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask", "position_ids",
                                                   "past_key_values.0.key", "past_key_values.0.value"]
    assert [o.name for o in proto.graph.output] == ["logits", "present.0.key", "present.0.value"]
    assert len(without_unread_caches(decoder).signature.names) == 3 + 4  # nothing dropped: graph unchanged


def test_pruned_kv_groups_shrink_the_cache_and_the_genai_config(decoder):
    from rarefy.backends.onnx_decoder import genai_config

    out = rf.optimize(decoder, [P.PruneHeads(fraction=0.5)], calibration=batches(2, 1), evaluation=batches(1, 2),
                      progress=False)
    assert out.report.rows[1].stats["pruned_heads"] == 2  # one of the two KV groups in each block
    assert all(shape[1] == 1 for shape in out.signature.shapes[3:])
    config = genai_config(out)["model"]["decoder"]
    assert (config["num_key_value_heads"], config["num_attention_heads"]) == (1, 2)
    proto = decoder_proto(out)
    assert all(i.type.tensor_type.shape.dim[1].dim_value == 1 for i in proto.graph.input[3:])


@pytest.fixture(scope="module")
def tied_decoder():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=tiny_models.VOCAB, tie_word_embeddings=True)
    return rf.capture_causal_lm(tf.LlamaForCausalLM(config).eval())


@pytest.mark.parametrize("bits, lookup", [(4, "GatherBlockQuantized"), (8, "GatherBlockQuantized"), (3, "Gather")])
def test_a_tied_head_and_embedding_are_quantized_once(tied_decoder, bits, lookup):
    out = rf.optimize(tied_decoder, [P.QuantizeWeights(bits=bits, group_size=32)], calibration=batches(2, 1),
                      evaluation=batches(1, 2), progress=False)
    gm = out.fx
    lookups = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.rarefy.embedding_nbits.default]
    heads = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.rarefy.matmul_nbits.default
             and "lm_head" in n.args[1].target]
    assert len(lookups) == 1 and len(heads) == 1
    assert lookups[0].args[1].target == heads[0].args[1].target  # one packed table, read by both
    assert not any(n.op == "call_function" and n.target is torch.ops.aten.embedding.default for n in gm.graph.nodes)
    table = tiny_models.VOCAB * 64
    assert out.parameter_bytes() < tied_decoder.parameter_bytes() - 3 * table  # the fp32 table (4 bytes a value) is gone
    proto = decoder_proto(out)
    assert lookup in {n.op_type for n in proto.graph.node}
    packed = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.UINT8 and "lm_head" in i.name]
    assert len(packed) == 1  # stored once in the file too
    ids = batches(1, 3)[0]["input_ids"]
    full = out(input_ids=ids)[0]
    assert ((decode_in_ort(out, ids) - full).abs().max() / full.abs().max()).item() <= 1e-4


def test_ignoring_the_head_keeps_the_tied_table_fp32(tied_decoder):
    out = rf.optimize(tied_decoder, [P.QuantizeWeights(bits=4, group_size=32, ignore=["lm_head"])],
                      calibration=batches(2, 1), evaluation=batches(1, 2), progress=False)
    assert any(n.op == "call_function" and n.target is torch.ops.aten.embedding.default for n in out.fx.graph.nodes)
    assert not any(n.op == "call_function" and n.target is torch.ops.rarefy.embedding_nbits.default
                   for n in out.fx.graph.nodes)
