"""rf.capture_decoder: one decode step with the KV cache as explicit inputs and outputs."""
import pytest
import torch
import transformers as tf

import rarefy as rf
from rarefy.ir.decoder import DecoderStep, teacher_forced_logits

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
ARCHITECTURES = {  # grouped-query attention in llama / qwen2 / mistral; fused qkv in phi3 / gpt_neox
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON, num_key_value_heads=2)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON, num_key_value_heads=2)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=None)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**COMMON, num_key_value_heads=4, pad_token_id=0)),
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**COMMON)),
}


def tiny(name):
    torch.manual_seed(0)
    return ARCHITECTURES[name]().eval()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_step_matches_the_model_and_hf_greedy(name):
    model = tiny(name)
    step = rf.capture_decoder(model, max_cache_len=24)
    # it fired: a DecoderStep whose caches are inputs and outputs, one cache op pair per layer
    assert isinstance(step, DecoderStep)
    assert [s.name for s in step.sites("kv_cache")] and len(step.sites("kv_cache")) == 2
    ops = [n.target for n in step.fx.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.rarefy.cache_attention.default) == 2
    assert step.signature.names[:2] == ["input_ids", "cache_position"] and len(step.signature.names) == 6
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
    # equivalent: token-by-token through the cache == one full forward (fp32 reordering only)
    torch.testing.assert_close(teacher_forced_logits(step, ids), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(teacher_forced_logits(step, ids, prefill=7), full, atol=1e-5, rtol=0)
    prompt = ids[:, :5]
    hf = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                        pad_token_id=0)
    assert torch.equal(rf.generate(step, prompt, max_new_tokens=8), hf)


def test_capture_leaves_the_model_unchanged():
    model = tiny("llama")
    model.train()
    before = model.config._attn_implementation
    rf.capture_decoder(model, max_cache_len=8)
    assert model.training and model.config._attn_implementation == before and model.config.use_cache


def test_bad_requests_name_the_problem():
    with pytest.raises(rf.CaptureError, match="causal LM"):
        rf.capture_decoder(torch.nn.Linear(4, 4), max_cache_len=8)
    with pytest.raises(rf.CaptureError, match="max_cache_len"):
        rf.capture_decoder(tiny("llama"), max_cache_len=0)
    step = rf.capture_decoder(tiny("llama"), max_cache_len=8)
    with pytest.raises(rf.UnsupportedError, match="max_cache_len=8"):
        rf.generate(step, torch.zeros(1, 6, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(rf.UnsupportedError, match="capture_decoder"):
        rf.generate(rf.capture(tiny("llama"), {"input_ids": torch.zeros(2, 4, dtype=torch.long)}),
                    torch.zeros(1, 2, dtype=torch.long), max_new_tokens=1)
