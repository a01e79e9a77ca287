"""Capture of the two bundled real models (quick: short inputs)."""
import pytest
import torch

import rarefy as rf

pytestmark = pytest.mark.real
EXACT_ATOL = 1e-4  # fp32 over 6 and 30 real layers: same kernels, rounding noise only


def test_minilm_captures_exactly_with_its_structure():
    from rarefy.models import load_minilm

    model, tok = load_minilm()
    batch = dict(tok(["a short one", "and a longer sentence with more words"], padding=True, return_tensors="pt"))
    g = rf.capture(model, batch)
    other = dict(tok(["three", "sentences of", "different lengths here"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        ref = model(**other).last_hidden_state
    assert (g(**other).last_hidden_state - ref).abs().max().item() <= EXACT_ATOL
    blocks = g.sites("block")
    assert [b.name for b in blocks] == [f"encoder.layer.{i}" for i in range(6)]
    att = g.sites("attention")[0]
    assert att.info["num_heads"] == 12 and att.info["head_dim"] == 32
    assert len(g.sites("linear")) == 37  # 6 x (q, k, v, o, up, down) + pooler


def test_smollm2_captures_exactly_with_grouped_query_attention():
    from rarefy.models import load_smollm2

    model, tok = load_smollm2()
    ids = tok(["The quick brown fox jumps over"], return_tensors="pt")["input_ids"]
    g = rf.capture(model, {"input_ids": ids.repeat(2, 1)})
    other = tok(["In the beginning God created the heaven"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=other).logits
    assert (g(input_ids=other).logits - ref).abs().max().item() <= EXACT_ATOL
    assert len(g.sites("block")) == 30
    att = g.sites("attention")[0]
    assert (att.info["num_heads"], att.info["num_kv_heads"], att.info["head_dim"]) == (9, 3, 64)
    assert {s.name for s in g.sites("linear")} >= {"model.layers.29.mlp.down_proj", "lm_head"}
