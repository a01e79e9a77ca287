"""Channel-dependency groups and residual blocks on tiny Llama (GQA), BERT and OPT."""
import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import rarefy as rf
from rarefy.ir.structure import COUPLING, dependency_groups, group_summary, residual_blocks, slot_graph

VOCAB = 128


def _capture(model, with_mask=False):
    ids = torch.randint(0, VOCAB, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if with_mask else {"input_ids": ids}
    return rf.capture(model.eval(), inputs)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return _capture(LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)))


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return _capture(BertModel(BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=VOCAB)), with_mask=True)


@pytest.fixture(scope="module")
def opt():
    torch.manual_seed(0)
    return _capture(OPTForCausalLM(OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                             vocab_size=VOCAB, word_embed_proj_dim=64)))


def _by_kind(groups, kind):
    return [g for g in groups if g.kind == kind]


def test_llama_mlp_group_couples_gate_up_rows_and_down_columns(llama):
    mlp = _by_kind(dependency_groups(llama), "mlp_channels")
    assert len(mlp) == 2 and all(g.prunable for g in mlp)
    group = next(g for g in mlp if g.blocks == ["model.layers.0"])
    prefix = "model.layers.0.mlp."
    assert group.params == {prefix + "gate_proj.weight": [(0, 128)], prefix + "up_proj.weight": [(0, 128)],
                            prefix + "down_proj.weight": [(1, 128)]}
    assert group.units == 128 and group.consumers == [prefix + "down_proj.weight"]


def test_llama_gqa_heads_group_counts_kv_groups(llama):
    heads = _by_kind(dependency_groups(llama), "attention_heads")
    assert len(heads) == 2 and all(g.prunable for g in heads)
    group = next(g for g in heads if g.blocks == ["model.layers.1"])
    # 4 query heads share 2 KV heads: the removable unit is a KV group (q: 32 rows, k/v: 16 rows)
    assert group.units == 2
    attn = "model.layers.1.self_attn."
    assert group.params[attn + "q_proj.weight"] == [(0, 64)] and group.params[attn + "k_proj.weight"] == [(0, 32)]
    assert group.params[attn + "o_proj.weight"] == [(1, 64)]
    assert group.indices(64, [1]).tolist() == list(range(32, 64))


def test_residual_stream_is_one_group_excluded_with_its_reason(llama, bert):
    for graph in (llama, bert):
        hidden = [g for g in dependency_groups(graph) if g.kind == "hidden" and len(g.blocks) > 1]
        assert len(hidden) == 1 and not hidden[0].prunable
        assert hidden[0].reason.startswith("the residual hidden stream couples every block")
        assert "also:" in hidden[0].reason  # and what else blocks it (a norm, the graph output)


def test_bert_encoder_groups(bert):
    groups = dependency_groups(bert)
    summary = group_summary(groups)
    assert summary["attention_heads:prunable"] == 2 and summary["mlp_channels:prunable"] == 2
    heads = _by_kind(groups, "attention_heads")[0]
    assert heads.units == 4
    assert any(p.endswith("query.bias") for p in heads.params)  # biases follow their rows


def test_opt_groups_and_residual_adds(opt):
    groups = dependency_groups(opt)
    assert len([g for g in _by_kind(groups, "attention_heads") if g.prunable]) == 2
    assert len([g for g in _by_kind(groups, "mlp_channels") if g.prunable]) == 2
    assert len(residual_blocks(opt)) == 4


def test_residual_blocks_llama_and_bert(llama, bert):
    adds = residual_blocks(llama)
    assert [a.block for a in adds] == ["model.layers.0"] * 2 + ["model.layers.1"] * 2
    assert all(a.branch.target is torch.ops.aten.linear.default for a in adds)  # o_proj and down_proj
    bert_adds = residual_blocks(bert)
    assert len(bert_adds) == 4  # post-norm: the stream runs through the LayerNorm after each add


def test_unknown_op_blocks_its_groups_and_is_named(llama, monkeypatch):
    monkeypatch.delitem(COUPLING, torch.ops.aten.silu.default)
    mlp = _by_kind(dependency_groups(llama), "mlp_channels")
    blocked = [g for g in dependency_groups(llama) if "aten.silu.default" in g.reason]
    assert blocked and not any(g.prunable for g in blocked)
    assert not [g for g in mlp if g.prunable]


def test_slot_graph_is_networkx(llama):
    import networkx as nx

    g = slot_graph(llama.fx)
    assert isinstance(g, nx.Graph) and g.number_of_nodes() > 100
