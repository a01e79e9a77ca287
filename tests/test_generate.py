"""rf.generate: greedy decoding over a captured step, the same loop on torch, ONNX Runtime and Triton."""
import onnx
import pytest
import torch
import transformers as tf

import rarefy as rf
from rarefy.ir.decoder import teacher_forced_logits
from rarefy.passes import CompressKV


def tiny_qwen2():
    torch.manual_seed(0)
    config = tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128)
    return tf.Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2()


@pytest.fixture(scope="module")
def step(model):
    return rf.capture_decoder(model, max_cache_len=32)


def test_torch_generate_is_hf_greedy(model, step):
    prompt = torch.randint(0, 128, (3, 6))
    hf = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                        pad_token_id=0)
    assert torch.equal(rf.generate(step, prompt, max_new_tokens=10), hf)
    assert torch.equal(rf.generate(step, prompt, max_new_tokens=0), prompt)


def test_onnxruntime_generate_matches_torch(step, tmp_path):
    path = rf.export_onnx(step, tmp_path / "step.onnx")
    onnx.checker.check_model(onnx.load(str(path)))
    ort = rf.compile(step, "onnxruntime", optimize=False)
    prompt = torch.randint(0, 128, (2, 7))
    # the exported step runs prefill (T = 7) and decoding (T = 1) with the cache as explicit I/O
    assert torch.equal(rf.generate(step, prompt, 12, step=ort), rf.generate(step, prompt, 12))
    torch.testing.assert_close(teacher_forced_logits(ort, prompt, graph=step), teacher_forced_logits(step, prompt),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("compress", [None, CompressKV("quantize", bits=4, group_size=8, residual=8)],
                         ids=["dense", "kivi4"])
def test_triton_backend_decodes_through_the_kernel(step, compress):
    graph = step if compress is None else rf.optimize(step, [compress], progress=False)
    triton_step = rf.compile(graph, "triton")
    assert triton_step.kernels_used and triton_step.kernels_used[0].endswith("attention_triton")
    prompt = torch.randint(0, 128, (2, 20))
    # decode steps run the Triton kernel (interpreter here), fp32 products: summation order only
    torch.testing.assert_close(teacher_forced_logits(triton_step, prompt, graph=graph, prefill=4),
                               teacher_forced_logits(graph, prompt, prefill=4), atol=1e-4, rtol=0)
    assert rf.generate(graph, prompt[:, :3], 4, backend="triton").shape == (2, 7)


def test_bad_requests(step):
    with pytest.raises(rf.UnsupportedError, match="padded"):
        rf.generate(step, torch.ones(2, 4, dtype=torch.long), 2, attention_mask=torch.tensor([[0, 1, 1, 1]] * 2))
    with pytest.raises(rf.InputMismatchError, match=r"\[B, T\]"):
        rf.generate(step, torch.ones(4, dtype=torch.long), 2)


@pytest.mark.real
def test_smollm2_kivi4_generates_like_the_fp32_cache():
    from rarefy.models import load_smollm2

    model, tokenizer = load_smollm2()
    step = rf.capture_decoder(model, max_cache_len=64)
    small = rf.optimize(step, [CompressKV("quantize", bits=4, group_size=32, residual=0)], progress=False)
    prompt = tokenizer("In the beginning God created the heaven and the earth. And the earth was without form, "
                       "and void; and darkness was upon the face of the deep.", return_tensors="pt").input_ids
    dense = rf.generate(step, prompt, max_new_tokens=4)
    hf = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    assert torch.equal(dense, hf)
    # 32+ prompt tokens are quantized to 4 bits; the first greedy tokens stay those of the fp32 cache
    assert torch.equal(rf.generate(small, prompt, max_new_tokens=4)[:, :prompt.shape[1] + 2],
                       dense[:, :prompt.shape[1] + 2])
    # at 64 slots the fp16 window of one key group (32 tokens) is half the fp32 bytes it replaces
    assert small.cache_bytes() < 0.45 * step.cache_bytes()
