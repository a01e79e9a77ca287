"""The `rarefy` command: optimize (ONNX file, HF folder), report, passes, and its errors."""
import json
import subprocess
import sys

import onnx
import pytest
import torch
import transformers as tf

import rarefy as rf
from rarefy.cli import main

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
SMALL_DATA = ["--calibration-batches", "2", "--evaluation-batches", "1", "--batch-size", "2", "--seq-len", "16"]


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    """A tiny MLP written as ONNX by rarefy itself (float input, dynamic batch)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).eval()
    path = tmp_path_factory.mktemp("onnx") / "mlp.onnx"
    rf.export_onnx(rf.capture(model, (torch.randn(2, 64),)), path)
    return path


def _word_tokenizer():
    """A word-level tokenizer over 128 ids, built offline (most words map to [UNK])."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]"] + "the of and to a in is that for it be as with on are this by not or from".split()
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"w{i}": i for i in range(len(vocab), TINY["vocab_size"])})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    tf.LlamaForCausalLM(tf.LlamaConfig(**TINY, num_key_value_heads=2)).save_pretrained(folder)
    _word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """An encoder folder with no tokenizer: the command falls back to random token ids."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bert")
    tf.BertModel(tf.BertConfig(**TINY)).save_pretrained(folder)
    return folder


def _optimize(capsys, *argv):
    code = main(["optimize", *map(str, argv), "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def _check_artifacts(out_dir, passes):
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.onnx", "recipe.json", "report.json"]
    onnx.checker.check_model(str(out_dir / "model.onnx"))
    assert [p["pass"] for p in json.loads((out_dir / "recipe.json").read_text())["passes"]] == passes
    assert rf.Recipe.load(out_dir / "recipe.json").to_dict()["passes"][0]["pass"] == passes[0]
    return rf.Report.load(out_dir / "report.json")


def test_optimize_onnx_file(onnx_file, tmp_path, capsys):
    before = onnx_file.read_bytes()
    code, out, err = _optimize(capsys, onnx_file, "--pass", "EliminateDeadCode", "-o", tmp_path / "out", *SMALL_DATA)
    assert code == 0, err
    report = _check_artifacts(tmp_path / "out", ["EliminateDeadCode"])
    # it fired and was measured on inputs fitted to the file's signature; exact at fp32 tolerance
    assert report.row("EliminateDeadCode").status in ("applied", "unchanged")
    assert report.row("EliminateDeadCode").max_abs_error <= 1e-5
    assert "random inputs fitted to the ONNX signature" in report.evaluation
    assert "EliminateDeadCode()" in out and "wrote" in out
    assert onnx_file.read_bytes() == before  # the user's model is untouched
    # still valid: the artifact runs in ONNX Runtime with optimizations off, like the input
    x = torch.randn(3, 64)
    original, optimized = rf.load(onnx_file), rf.load(tmp_path / "out" / "model.onnx")
    torch.testing.assert_close(rf.compile(optimized, "onnxruntime", optimize=False)(x), original(x),
                               atol=1e-5, rtol=1e-5)


def test_optimize_onnx_file_with_default_recipe(onnx_file, tmp_path, capsys):
    code, out, err = _optimize(capsys, onnx_file, "-o", tmp_path / "out", *SMALL_DATA)
    assert code == 0, err
    report = _check_artifacts(tmp_path / "out", ["EliminateDeadCode", "QuantizeWeights"])
    assert report.row("QuantizeWeights").stats["quantized_linear"] == 2
    # int8 per-channel weights: torchao uses ~45 dB for int8; 35 leaves room for random inputs
    assert report.row("QuantizeWeights").sqnr_db > 35


def test_optimize_hf_folder_with_pass_specs_and_real_text(llama_folder, tmp_path, capsys):
    code, out, err = _optimize(capsys, llama_folder, "--pass", "EliminateDeadCode",
                               "--pass", "QuantizeWeights:bits=4,group_size=32,ignore=lm_head",
                               "-o", tmp_path / "out", *SMALL_DATA)
    assert code == 0, err
    report = _check_artifacts(tmp_path / "out", ["EliminateDeadCode", "QuantizeWeights"])
    row = report.row("QuantizeWeights")
    assert row.stats["quantized_linear"] == 14  # 2 layers x (4 attention + 3 MLP); lm_head ignored
    assert any("lm_head" in note for note in row.notes)
    # 4-bit group-32 RTN on random weights: torchao quotes 16-20 dB for 4-bit; 15 is the floor here
    assert row.sqnr_db > 15
    assert "pydoc" in report.calibration and "kjv" in report.evaluation
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert recipe["passes"][1] == {"pass": "QuantizeWeights", "bits": 4, "group_size": 32, "ignore": "lm_head"}
    assert recipe["calibration"]["seq_len"] == 16 and recipe["source"] == "LlamaForCausalLM"


def test_optimize_with_recipe_file_and_report(bert_folder, tmp_path, capsys):
    recipe = rf.Recipe([{"pass": "QuantizeWeights", "bits": 4, "group_size": 32}])
    recipe.save(tmp_path / "r.yaml")
    code, _, err = _optimize(capsys, bert_folder, "--recipe", tmp_path / "r.yaml", "-o", tmp_path / "out", *SMALL_DATA)
    assert code == 0, err
    report = _check_artifacts(tmp_path / "out", ["QuantizeWeights"])
    assert report.row("QuantizeWeights").stats["quantized_linear"] == 13  # 2 x (4 attention + 2 MLP) + pooler
    assert report.evaluation == "random token ids (the model has no tokenizer)"
    assert main(["report", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "QuantizeWeights(bits=4, group_size=32)" in out and "SQNR dB" in out


def test_passes_lists_every_pass_and_documents_one(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    public = [name for name in rf.passes.registered_passes() if not name.startswith("_")]
    assert [line.split()[0] for line in out.splitlines()] == public
    assert main(["passes", "QuantizeWeights"]) == 0
    out = capsys.readouterr().out
    assert "QuantizeWeights(bits: int = 8, group_size: int | None = None" in out
    assert "GPTQ" in out  # the module docstring, which names the paper


def test_bad_recipe_is_one_line_and_exit_2(onnx_file, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("passes:\n  - pass: Quantise\n")
    code, out, err = _optimize(capsys, onnx_file, "--recipe", tmp_path / "r.yaml", "-o", tmp_path / "out")
    assert code == 2
    assert err.startswith("rarefy: error:") and "Quantise" in err and "QuantizeWeights" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unwritable_output_dir_fails_before_work_and_leaves_nothing(onnx_file, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("not a directory")
    code, _, err = _optimize(capsys, onnx_file, "-o", tmp_path / "file.txt" / "out")
    assert code == 2
    assert "cannot write to output directory" in err and "file.txt" in err
    assert (tmp_path / "file.txt").read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_failed_run_removes_the_directory_it_created(tmp_path, capsys):
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    code, _, err = _optimize(capsys, tmp_path / "bad.onnx", "-o", tmp_path / "new" / "out")
    assert code == 2 and "bad.onnx" in err
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "bad.onnx").read_bytes() == b"\x08\x07garbage"


def test_unknown_model_and_missing_report(tmp_path, capsys):
    assert _optimize(capsys, "no-such-model", "-o", tmp_path / "out")[0] == 2
    assert main(["report", str(tmp_path)]) == 2
    assert "no report at" in capsys.readouterr().err


def test_entry_point_prints_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "rarefy.cli", "passes", "NoSuchPass"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("rarefy: error: unknown pass 'NoSuchPass'")
    assert "Traceback" not in proc.stderr
