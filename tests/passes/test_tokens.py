"""PruneTokens / MergeTokens on tiny BERT (encoder, padding), ViT (static length) and Llama (GQA, FastV
prefill); the token ops against independent references; ONNX Runtime and Triton lowering; bad requests;
a quick real MiniLM check."""
import math
import sys
from pathlib import Path

import onnx
import pytest
import torch

import rarefy as rf
from rarefy.eval.metrics import cosine
from rarefy.ir.errors import PassError, UnsupportedError
from rarefy.kernels import token_select
from rarefy.models import mean_pool_embedding
from rarefy.ir.signature import split_inputs
from rarefy.passes import MergeTokens, PruneTokens
from rarefy.passes.tokens import attention_call, token_blocks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import build, example_inputs  # noqa: E402


def _capture(name, seq=16):
    model, inputs = build(name, seq=seq)
    return rf.capture(model, inputs), inputs


def _first(out):
    return torch.utils._pytree.tree_leaves(out)[0]


def _ort_matches(graph, inputs, atol):
    """Exports, passes onnx.checker, runs in ONNX Runtime (optimisations off) like the torch graph."""
    session = rf.compile(graph, "onnxruntime", optimize=False)
    onnx.checker.check_model(session.model_proto)
    for ours, theirs in zip(torch.utils._pytree.tree_leaves(graph(**inputs)),
                            torch.utils._pytree.tree_leaves(session(**inputs))):
        torch.testing.assert_close(theirs, ours, atol=atol, rtol=0)


def _values(graph, inputs, wanted) -> dict:
    """{node: value} of the graph's nodes that ``wanted`` picks, from one run on ``inputs``."""
    values = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if wanted(node):
                values[node] = out
            return out

    Recorder(graph.fx).run(*graph.signature.flatten(*split_inputs(inputs)))
    return values


# -- the ops' math against independent references ------------------------------------------------
def test_select_tokens_keeps_cls_and_last_ranks_padding_last_and_sorts():
    scores = torch.tensor([[0.0, 0.1, 0.9, 0.3, 0.8, 0.95], [0.0, 0.5, 0.1, 0.2, 0.9, 0.9]])
    valid = torch.tensor([[True] * 6, [True, True, True, True, False, False]])  # row 1: two padding tokens
    index = token_select.select_tokens(scores, valid, 1, 2, True, False)
    assert index.tolist() == [[0, 2, 5], [0, 1, 3]]  # CLS forced; high-scoring padding never outranks real
    index = token_select.select_tokens(scores, valid, 1, 2, False, True)
    assert index.tolist() == [[2, 4, 5], [1, 3, 5]]  # FastV: the last token forced
    assert token_select.select_tokens(scores, valid, 1, 1, True, False).tolist() == [list(range(6))] * 2


def test_gather_mask_and_scatter_match_plain_indexing():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 1, 7, 7, generator=gen) > 0.3
    index = torch.tensor([[0, 2, 5], [1, 3, 6]])
    rows = torch.arange(2)[:, None, None]
    expected = mask[:, 0][rows, index[:, :, None], index[:, None, :]][:, None]
    assert torch.equal(token_select.gather_mask(mask, index), expected)
    kept = torch.randn(2, 3, 4, generator=gen)
    valid = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    full = token_select.scatter_tokens(kept, index, valid)
    assert torch.equal(full[rows[:, :, 0], index], kept)
    # Pooling over the original mask equals the mean over the kept real tokens (row 1 kept index 6 is padding).
    pooled = (full * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
    torch.testing.assert_close(pooled[0], kept[0].mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled[1], kept[1, :2].mean(0), atol=1e-6, rtol=0)


def test_attention_received_matches_explicit_softmax_with_gqa():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8, generator=gen), torch.randn(2, 2, 5, 8, generator=gen)
    scores, valid = token_select.attention_received(q, k, None, 8 ** -0.5, False, False)
    probs = torch.softmax(q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(scores, probs.mean(dim=(1, 2)), atol=1e-6, rtol=0)
    assert valid.all() and torch.allclose(scores.sum(-1), torch.ones(2))


def test_merge_tokens_conserves_mass_and_tracks_sources():
    gen = torch.Generator().manual_seed(0)
    hidden, keys = torch.randn(2, 9, 6, generator=gen), torch.randn(2, 3, 9, 4, generator=gen)
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool)
    mask[1, ..., 7:] = False  # two padding tokens in row 1
    out, size, valid, slot, add_mask = token_select.merge_tokens(hidden, keys, None, None, None, mask, 3, True)
    assert out.shape == (2, 6, 6) and size.sum(-1).tolist() == [9.0, 9.0]
    # Size-weighted sums are conserved: each input token lives in exactly one merged token.
    torch.testing.assert_close((out * size[..., None]).sum(1), hidden.sum(1), atol=1e-5, rtol=0)
    assert slot[:, 0].tolist() == [0, 0] and torch.equal(out[:, 0], hidden[:, 0])  # CLS never merged
    # Every source reads back its merged token; padding never merges into a real token.
    assert torch.equal(valid.gather(1, slot)[1], mask[1, 0, 0])
    torch.testing.assert_close(add_mask[:, 0, 0][valid], size.log()[valid], atol=0, rtol=0)


def test_fuse_pruned_is_the_weighted_mean_of_pruned_real_tokens_and_pools_size_weighted():
    gen = torch.Generator().manual_seed(0)
    hidden, scores = torch.randn(2, 6, 4, generator=gen), torch.rand(2, 6, generator=gen)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    index = torch.tensor([[0, 2, 5], [0, 1, 3]])
    fused, size = token_select.fuse_pruned(hidden, index, scores, valid, True)
    w = scores[0, [1, 3, 4]]  # row 0 prunes 1, 3, 4; row 1 prunes 2 (real) and 4, 5 (padding: dropped)
    torch.testing.assert_close(fused[0, 0], (w[:, None] * hidden[0, [1, 3, 4]]).sum(0) / w.sum(), atol=1e-6, rtol=0)
    torch.testing.assert_close(fused[1, 0], hidden[1, 2], atol=1e-6, rtol=0)
    assert size.tolist() == [[1, 1, 1, 3], [1, 1, 1, 1]]
    mask = token_select.fused_mask(valid[:, None, None, :], index, size)
    assert mask.shape == (2, 1, 1, 4) and mask[0, 0, 0, 3] == math.log(3) and mask[0, 0, 0, :3].eq(0).all()
    out = torch.randn(2, 4, 4, generator=gen)
    full = token_select.scatter_fused(out, index, valid)
    # Mean pooling over the original mask = the size-weighted mean of the kept and fused tokens.
    pooled = (full * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
    torch.testing.assert_close(pooled[0], (out[0] * size[0, :, None]).sum(0) / 6, atol=1e-6, rtol=0)


# -- PruneTokens ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bert", "vit", "llama"])
def test_keep_one_is_exact(name):
    graph, inputs = _capture(name)
    out = rf.optimize(graph, [PruneTokens(keep=1.0, after_layer=1)], progress=False, verify=False)
    assert out.report.rows[-1].stats["blocks_on_kept_tokens"] == 1
    for ref, got in zip(torch.utils._pytree.tree_leaves(graph(**inputs)), torch.utils._pytree.tree_leaves(out(**inputs))):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)  # fp32: the kept set is every token


def test_bert_prune_fires_keeps_pooling_close_and_survives_dynamic_lengths():
    graph, inputs = _capture("bert")
    out = PruneTokens(keep=0.5, after_layer=1)(graph.copy())
    assert out.stats == {"blocks_on_kept_tokens": 1, "masks_gathered": 1, "rotary_tables_gathered": 0,
                         "outputs_restored": 1, "static_lengths_replaced": 0, "fused_tokens": 0,
                         "size_masks_added": 0}
    assert sum(n.target is torch.ops.rarefy.select_tokens.default for n in out.graph.fx.graph.nodes) == 1
    ref, got = graph(**inputs), out.graph(**inputs)
    assert got[0].shape == ref[0].shape
    # Floor: half the tokens of a random 2-layer model dropped before its last layer; the mean-pooled
    # embedding (the quantity MiniLM users consume) measured 0.97 here, [CLS] pooling is ~exact.
    emb = [mean_pool_embedding(o[0], inputs["attention_mask"]) for o in (ref, got)]
    assert cosine(emb[1], emb[0]) >= 0.9
    assert cosine(got[1], ref[1]) >= 0.99
    for seq in (9, 13):  # the kept count follows the runtime length
        other = example_inputs("bert", batch=3, seq=seq)
        assert out.graph(**other)[0].shape == (3, seq, 64)
    _ort_matches(out.graph, example_inputs("bert", batch=3, seq=13), atol=1e-4)


def test_bert_prune_with_evit_fusion_and_cls_scores_fires_and_lowers():
    graph, inputs = _capture("bert")
    out = PruneTokens(keep=0.5, after_layer=1, score="cls", fuse=True)(graph.copy())
    assert out.stats["fused_tokens"] == 1 and out.stats["masks_gathered"] == 1
    targets = [n.target for n in out.graph.fx.graph.nodes]
    assert torch.ops.rarefy.fuse_pruned.default in targets and torch.ops.rarefy.scatter_fused.default in targets
    ref, got = graph(**inputs), out.graph(**inputs)
    # Floor: as the plain prune above (measured 0.97 there); the fused token stands in for the pruned half.
    emb = [mean_pool_embedding(o[0], inputs["attention_mask"]) for o in (ref, got)]
    assert cosine(emb[1], emb[0]) >= 0.9
    other = example_inputs("bert", batch=3, seq=13)
    assert out.graph(**other)[0].shape == (3, 13, 64)  # ceil(0.5 * 13) + 1 tokens inside, full length out
    _ort_matches(out.graph, other, atol=1e-4)


def test_llama_prefill_prune_keeps_last_token_and_positions():
    graph, inputs = _capture("llama")
    out = PruneTokens(keep=0.5, after_layer=1)(graph.copy())
    assert out.stats["rotary_tables_gathered"] == 2 and out.stats["outputs_restored"] == 0
    ref, got = _first(graph(**inputs)), _first(out.graph(**inputs))
    assert got.shape == (2, 8, ref.shape[-1])  # logits for the kept positions only
    # Floor: next-token logits (last position) after dropping half the prompt before the last of two
    # random layers; measured 0.96. A position bug (no rotary gather) gives ~0.5.
    assert cosine(got[:, -1], ref[:, -1]) >= 0.9
    other = example_inputs("llama", batch=1, seq=11)
    assert _first(out.graph(**other)).shape == (1, 6, ref.shape[-1])
    _ort_matches(out.graph, other, atol=1e-4)


@pytest.mark.parametrize("name", ["bert", "vit", "llama"])
def test_lookahead_scores_with_the_next_block_on_every_token(name):
    graph, inputs = _capture(name)
    exact = rf.optimize(graph, [PruneTokens(keep=1.0, after_layer=1, lookahead=True)], progress=False, verify=False)
    for ref, got in zip(torch.utils._pytree.tree_leaves(graph(**inputs)), torch.utils._pytree.tree_leaves(exact(**inputs))):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    result = PruneTokens(keep=0.5, after_layer=1, lookahead=True)(graph.copy())
    result.graph.fx.graph.lint()
    assert result.details["scoring_block"] == result.details["shortened_blocks"][0]
    if name == "bert":
        # The kept set is what the next block's own attention, in the unpruned graph, ranks highest.
        attention = attention_call(token_blocks(graph, "test")[1])
        wanted = {attention[key] for key in ("q", "k", "mask")}
        unpruned = _values(graph, inputs, lambda n: n in wanted)
        scores, valid = token_select.attention_received(
            unpruned[attention["q"]], unpruned[attention["k"]], unpruned.get(attention["mask"]), attention["scale"],
            False, False)
        expected = token_select.select_tokens(scores, valid, 1, 2, True, False)
        kept = _values(result.graph, inputs, lambda n: n.target is torch.ops.rarefy.select_tokens.default)
        assert torch.equal(next(iter(kept.values())), expected)
    ref = _first(graph(**inputs))
    got = _first(result.graph(**inputs))
    if name == "llama":
        assert got.shape[1] == math.ceil(ref.shape[1] / 2)  # logits for the kept positions only
        _ort_matches(result.graph, example_inputs("llama", batch=1, seq=11), atol=1e-4)
    else:
        assert got.shape == ref.shape
        _ort_matches(result.graph, inputs, atol=1e-4)


def test_eager_and_fused_attention_captures_prune_the_same_tokens():
    from transformers import BertConfig, BertModel

    inputs = example_inputs("bert", seq=16)
    outs = []
    for attn in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = BertModel(BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     vocab_size=128, attn_implementation=attn)).eval()
        graph = rf.capture(model, inputs)
        outs.append(PruneTokens(keep=0.5, after_layer=1)(graph.copy()).graph(**inputs)[0])
    # Eager reads the graph's softmax, SDPA recomputes it from q/k: same scores, same kept set (fp32).
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


def test_triton_backend_runs_the_gather_kernel():
    graph, inputs = _capture("bert")
    out = PruneTokens(keep=0.5, after_layer=1)(graph.copy()).graph
    compiled = rf.compile(out, "triton")
    assert "gather_tokens" in compiled.kernels_used
    for ref, got in zip(torch.utils._pytree.tree_leaves(out(**inputs)),
                        torch.utils._pytree.tree_leaves(compiled(**inputs))):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)  # a gather is a copy: same math


# -- MergeTokens ---------------------------------------------------------------------------------------
def test_merge_zero_is_exact():
    graph, inputs = _capture("vit")
    result = MergeTokens(r=0)(graph.copy())
    assert not result.modified and result.stats == {"merges": 0}
    torch.testing.assert_close(result.graph(**inputs)[0], graph(**inputs)[0], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["vit", "bert"])
def test_merge_fires_stays_close_and_lowers(name):
    graph, inputs = _capture(name)
    out = rf.optimize(graph, [MergeTokens(r=3)], progress=False, verify=False)
    stats = out.report.rows[-1].stats
    assert stats["merges"] == 1 and stats["tokens_merged_per_row"] == 3
    assert sum(n.target is torch.ops.rarefy.merge_tokens.default for n in out.fx.graph.nodes) == 1
    ref, got = graph(**inputs), out(**inputs)
    assert got[0].shape == ref[0].shape  # unmerged back to every original position
    # Floor: 3 of 16-17 tokens merged before the last of two random layers; the pooled output
    # measured >= 0.999 (ViT [CLS]) and 1.0 (BERT [CLS]): [CLS] is never merged.
    assert cosine(got[1], ref[1]) >= 0.99
    if name == "vit":  # one ONNX Runtime check per op family keeps the suite quick (BERT prune runs one)
        _ort_matches(out, inputs, atol=1e-4)


def test_chained_merges_export_with_dynamic_length_and_match_onnx_runtime():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                 vocab_size=128)).eval()
    inputs = example_inputs("bert", seq=16)
    out = rf.optimize(rf.capture(model, inputs), [MergeTokens(r=2)], progress=False, verify=False)
    assert out.report.rows[-1].stats["merges"] == 2
    # Chained merges once stalled torch.export's symbolic solver (nested floor((S+1)/2) lengths);
    # every length is now S or S - r. Two runtime lengths, odd and even, through one ONNX graph.
    session = rf.compile(out, "onnxruntime", optimize=False)
    for seq in (16, 11):
        other = example_inputs("bert", batch=3, seq=seq)
        torch.testing.assert_close(session(**other)[0], out(**other)[0], atol=1e-4, rtol=0)  # fp32, same math


# -- bad requests: clear errors before any work -----------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"keep": 0.0, "after_layer": 1}, {"keep": 1.5, "after_layer": 1},
                                    {"keep": 0.5, "after_layer": 0}, {"keep": 0.5, "after_layer": 1, "score": "x"},
                                    {"keep": 0.5, "after_layer": 1, "fuse": "yes"},
                                    {"keep": 0.5, "after_layer": 1, "lookahead": 1}])
def test_bad_prune_arguments(kwargs):
    with pytest.raises(rf.RecipeError, match="PruneTokens: "):
        PruneTokens(**kwargs)


def test_bad_requests_on_graphs_fail_before_any_work():
    graph, _ = _capture("bert")
    with pytest.raises(PassError, match="beyond the depth"):
        rf.optimize(graph, [MergeTokens(r=1), PruneTokens(keep=0.5, after_layer=2)], progress=False)
    with pytest.raises(PassError, match="beyond the depth"):
        rf.optimize(graph, [MergeTokens(r=1, first_layer=2)], progress=False)
    with pytest.raises(rf.RecipeError, match="MergeTokens: r must be an integer >= 0"):
        MergeTokens(r=-1)
    llama, _ = _capture("llama")
    with pytest.raises(UnsupportedError, match="encoders"):
        rf.optimize(llama, [MergeTokens(r=1)], progress=False)
    with pytest.raises(PassError, match="CLS"):
        rf.optimize(llama, [PruneTokens(keep=0.5, after_layer=1, score="cls")], progress=False)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    plain = rf.capture(mlp, (torch.randn(2, 8),))
    with pytest.raises(UnsupportedError, match="no attention sites"):
        rf.optimize(plain, [PruneTokens(keep=0.5, after_layer=1)], progress=False)


# -- real model --------------------------------------------------------------------------------------------
@pytest.mark.real
def test_real_minilm_prune_keeps_embeddings():
    from rarefy.eval.data import sentence_batches
    from rarefy.models import load_minilm

    model, tokenizer = load_minilm(attn_implementation="sdpa")
    batch = sentence_batches(tokenizer, "kjv", "evaluation", n_batches=1, batch_size=4, max_len=48)[0]
    graph = rf.capture(model, batch)
    out = PruneTokens(keep=0.5, after_layer=2)(graph.copy()).graph
    emb = [mean_pool_embedding(g(**batch)[0], batch["attention_mask"]) for g in (graph, out)]
    cos = torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=-1)
    # Floor: measured mean 0.91 (rows 0.75-1.0) on these 4 sentences; the 0.95 target is not met
    # at keep 0.5 after layer 2 (see benchmarks/results/tokens.md). This guards against regressions:
    # a wrong mask or lost positions drops the mean below 0.7.
    assert cos.mean() >= 0.85 and cos.min() >= 0.7
