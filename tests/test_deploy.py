"""Decoder deployment: `rarefy optimize --decoder` folders run by ONNX Runtime GenAI, `rarefy generate`,
and their bad input. Tiny random Llama and Qwen2 saved as Hugging Face folders, with a byte-level
BPE tokenizer trained offline on Python's own docs (GenAI reads its tokenizer.json)."""
import json

import pytest
import torch
import transformers as tf

from rarefy.cli import main

og = pytest.importorskip("onnxruntime_genai")

PROMPTS = ["The Python language reference describes the syntax", "A class definition"]
NEW_TOKENS = 16
QUICK_DATA = ["--calibration-batches", "2", "--evaluation-batches", "1", "--batch-size", "2", "--seq-len", "32",
              "--quiet"]


def bpe_tokenizer(vocab: int = 384):
    from pydoc_data import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(topics.topics.values())[:100], trainer)
    special = "<|endoftext|>"
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=special, bos_token=special, pad_token=special)


CONFIGS = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(num_key_value_heads=2)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(num_key_value_heads=2)),
}


def save_causal_lm(folder, arch: str, seed: int = 0):
    tokenizer = bpe_tokenizer()
    config_cls, model_cls, extra = CONFIGS[arch]
    config = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=len(tokenizer), max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
                        pad_token_id=0, tie_word_embeddings=True, **extra)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # larger logits than the random init's, so greedy choices are not near-ties
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model, tokenizer = save_causal_lm(folder, request.param)
    return folder, model, tokenizer


def genai_tokens(folder, prompts: list[str]) -> list[list[int]]:
    """Greedy new tokens for each prompt, as one (left-padded) batch in ONNX Runtime GenAI."""
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(batch_size=len(prompts), max_length=_longest(tokenizer, prompts) + NEW_TOKENS,
                              do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(tokenizer.encode_batch(prompts))
    rows = [[] for _ in prompts]
    while not generator.is_done():
        generator.generate_next_token()
        for row, token in zip(rows, generator.get_next_tokens()):
            row.append(int(token))
    return rows


def _longest(tokenizer, prompts) -> int:
    return max(len(tokenizer.encode(p)) for p in prompts)


def hf_tokens(model, tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def fp32_folder(hf_folder, tmp_path_factory):
    folder, _, _ = hf_folder
    out = tmp_path_factory.mktemp("fp32")
    assert main(["optimize", str(folder), "--decoder", "--pass", "EliminateDeadCode", "-o", str(out),
                 *QUICK_DATA]) == 0
    return out


def test_decoder_folder_holds_what_genai_needs(fp32_folder):
    names = {p.name for p in fp32_folder.iterdir()}
    assert {"model.onnx", "genai_config.json", "config.json", "generation_config.json", "tokenizer.json",
            "recipe.json", "report.json"} <= names
    decoder = json.loads((fp32_folder / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["num_hidden_layers"] == 2 and decoder["num_key_value_heads"] == 2 and decoder["head_size"] == 16
    import onnx

    proto = onnx.load(str(fp32_folder / "model.onnx"))
    assert [i.name for i in proto.graph.input][:5] == ["input_ids", "attention_mask", "position_ids",
                                                       "past_key_values.0.key", "past_key_values.0.value"]
    assert [o.name for o in proto.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]


def test_fp32_decoder_generates_what_transformers_generates(hf_folder, fp32_folder):
    _, model, tokenizer = hf_folder
    expected = [hf_tokens(model, tokenizer, p) for p in PROMPTS]
    assert genai_tokens(fp32_folder, PROMPTS[:1]) == expected[:1]
    # a left-padded batch: each row as that prompt run alone
    assert genai_tokens(fp32_folder, PROMPTS) == expected


def test_int8_decoder_agrees_with_transformers(hf_folder, tmp_path):
    folder, model, tokenizer = hf_folder
    out = tmp_path / "int8"
    assert main(["optimize", str(folder), "--decoder", "--pass", "QuantizeWeights:bits=8", "-o", str(out),
                 *QUICK_DATA]) == 0
    expected = hf_tokens(model, tokenizer, PROMPTS[0])
    got = genai_tokens(out, PROMPTS[:1])[0]
    assert sum(a == b for a, b in zip(got, expected)) >= 14, (got, expected)  # the bar: 14 of 16


def test_generate_streams_text_and_reports_speed(fp32_folder, capsys):
    assert main(["generate", str(fp32_folder), "--prompt", PROMPTS[0], "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "decode" in err and "tokens/s" in err and "prefill" in err


def test_generate_refuses_a_prompt_past_the_context(fp32_folder, capsys):
    long_prompt = " ".join(["definition"] * 200)  # > 128 positions with the new tokens
    assert main(["generate", str(fp32_folder), "--prompt", long_prompt, "--max-new-tokens", "8"]) == 2
    assert "past the model's context of 128" in capsys.readouterr().err


def test_generate_refuses_a_folder_without_tokenizer(fp32_folder, tmp_path, capsys):
    import shutil

    copy = tmp_path / "no_tokenizer"
    shutil.copytree(fp32_folder, copy)
    (copy / "tokenizer.json").unlink()
    assert main(["generate", str(copy), "--prompt", "x"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2


@pytest.mark.parametrize("arch", ["bert", "gpt_neox"])
def test_decoder_refuses_models_genai_cannot_run(arch, tmp_path, capsys):
    folder = tmp_path / arch
    tokenizer = bpe_tokenizer()
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=len(tokenizer))
    model = tf.BertModel(tf.BertConfig(**common)) if arch == "bert" else \
        tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**common))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    capsys.readouterr()  # the saving's own progress output
    out = tmp_path / "out"
    assert main(["optimize", str(folder), "--decoder", "-o", str(out), *QUICK_DATA]) == 2
    err = capsys.readouterr().err
    expected = "not a decoder-only causal LM" if arch == "bert" else "no decoder-only model type 'gpt_neox'"
    assert expected in err and err.count("\n") == 1
    assert not out.exists()  # nothing written, the directory it made removed


def test_decoder_refuses_an_onnx_file_and_a_folder_without_tokenizer(tmp_path, capsys):
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"")
    assert main(["optimize", str(onnx_path), "--decoder", "-o", str(tmp_path / "a"), "--quiet"]) == 2
    assert "is a file" in capsys.readouterr().err
    folder = tmp_path / "bare"
    tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, vocab_size=64)).save_pretrained(folder)
    assert main(["optimize", str(folder), "--decoder", "-o", str(tmp_path / "b"), "--quiet"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
