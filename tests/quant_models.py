"""Tiny models and checks shared by the GPTQ / AWQ / MixedPrecision tests (random weights, no downloads).

Three architectures: Llama with grouped-query attention (RMSNorm, gated MLP), Qwen2 (GQA,
biased q/k/v) and BERT (post-LayerNorm encoder, GELU MLP).
"""
from __future__ import annotations

import onnx
import torch
import transformers as tf

import rarefy as rf

VOCAB = 128
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
ARCHS = ("llama", "qwen2", "bert")


def tiny(name: str):
    """(captured graph, 4 calibration batches, 1 held-out batch) for a tiny model, fixed seed."""
    torch.manual_seed(0)
    if name == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**_COMMON, num_key_value_heads=2))
    elif name == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**_COMMON, num_key_value_heads=2))
    else:
        model = tf.BertModel(tf.BertConfig(**_COMMON))
    model.eval()
    gen = torch.Generator().manual_seed(1)

    def batch():
        ids = torch.randint(0, VOCAB, (2, 32), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    batches = [batch() for _ in range(5)]
    return rf.capture(model, batches[0]), batches[:4], batches[4:]


def assert_runs_in_onnxruntime(graph, batch, tmp_path) -> None:
    """Exports, passes onnx.checker, runs in ORT (optimizations off) like the torch reference."""
    path = rf.export_onnx(graph, tmp_path / "model.onnx")
    onnx.checker.check_model(str(path))
    expected = graph.run_batch(batch)[0]
    got = rf.compile(graph, "onnxruntime", optimize=False)(**batch)
    got = got[0] if isinstance(got, (tuple, list)) else getattr(got, "logits", None) \
        if hasattr(got, "logits") else got.last_hidden_state if hasattr(got, "last_hidden_state") else got
    # same packed weights, same math: only float summation order differs
    torch.testing.assert_close(torch.as_tensor(got), expected, rtol=1e-4, atol=1e-4)
