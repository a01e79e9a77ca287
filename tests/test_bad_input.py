"""Bad input gets a clear error and loses nothing (issue 2, point 8).

Each case asserts the exception type, that the message names the problem, and that the
user's file or model is left exactly as it was.
"""
import math
import os

import onnx
import pytest
import torch
import transformers as tf

import rarefy as rf
from rarefy.ir import io as rf_io


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).eval()


@pytest.fixture(scope="module")
def mlp_graph(mlp):
    return rf.capture(mlp, (torch.randn(2, 64),))  # dim 0 dynamic, dim 1 static (64)


@pytest.fixture(scope="module")
def onnx_bytes(mlp_graph, tmp_path_factory):
    path = rf.export_onnx(mlp_graph, tmp_path_factory.mktemp("onnx") / "mlp.onnx")
    return path.read_bytes()


@pytest.fixture(scope="module")
def bert_graph():
    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, vocab_size=128)).eval()
    ids = torch.randint(0, 128, (2, 8))
    return rf.capture(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


# -- ONNX files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, problem", [
    (lambda data: data[: len(data) // 2], "truncated or corrupt"),
    (lambda data: b"\x00garbage\xff" * 100, "truncated or corrupt"),
    (lambda data: b"", "holds no ONNX graph"),
])
def test_corrupt_or_truncated_onnx_file_is_a_load_error_and_kept(tmp_path, onnx_bytes, damage, problem):
    path = tmp_path / "model.onnx"
    bad = damage(onnx_bytes)
    path.write_bytes(bad)
    with pytest.raises(rf.LoadError) as info:
        rf.load(path)
    assert str(path) in str(info.value) and problem in str(info.value)
    assert path.read_bytes() == bad  # the user's file keeps its bytes


def test_missing_onnx_file_is_a_load_error(tmp_path):
    with pytest.raises(rf.LoadError, match="no such file"):
        rf.load(tmp_path / "absent.onnx")


def test_onnx_file_failing_the_checker_is_a_load_error(tmp_path, onnx_bytes):
    proto = onnx.load_from_string(onnx_bytes)
    proto.graph.node[0].input[0] = "undefined_tensor"
    path = tmp_path / "broken.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(rf.LoadError, match="onnx.checker"):
        rf.load(path)


# -- objects that are not models ---------------------------------------------------------------------
@pytest.mark.parametrize("obj", ["model.onnx", {"weight": torch.ones(2)}, lambda x: x, None])
def test_capture_of_a_non_module_names_what_it_got(obj):
    with pytest.raises(rf.CaptureError, match="expects a torch.nn.Module, got"):
        rf.capture(obj, (torch.randn(2, 64),))


def test_capture_with_non_tensor_inputs(mlp):
    before = _state(mlp)
    with pytest.raises(rf.CaptureError, match="example inputs must be tensors, got str"):
        rf.capture(mlp, ("hello",))
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


def test_graph_apis_reject_a_raw_module(mlp, tmp_path):
    with pytest.raises(rf.InputMismatchError, match=r"expects a rf.Graph, got Sequential.*rf.capture"):
        rf.optimize(mlp, [rf.passes.EliminateDeadCode()])
    with pytest.raises(rf.InputMismatchError, match="rf.compile expects a rf.Graph, got str"):
        rf.compile("model.onnx", backend="onnxruntime")
    with pytest.raises(rf.InputMismatchError, match="rf.export_onnx expects a rf.Graph"):
        rf.export_onnx(mlp, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_a_non_pass_in_the_pipeline(mlp_graph):
    with pytest.raises(rf.PassError, match=r"passes\[1\] is str, not a rarefy pass"):
        rf.optimize(mlp_graph, [rf.passes.EliminateDeadCode(), "QuantizeWeights"])


# -- inputs that do not match the captured signature ---------------------------------------------------
def test_wrong_dtype(bert_graph):
    ids = torch.randint(0, 128, (2, 8))
    expected = "'input_ids' has dtype torch.float32, the graph expects torch.int64"
    with pytest.raises(rf.InputMismatchError, match=expected):
        bert_graph(input_ids=ids.float(), attention_mask=torch.ones_like(ids))


def test_wrong_rank(bert_graph):
    ids = torch.randint(0, 128, (8,))
    with pytest.raises(rf.InputMismatchError, match=r"'input_ids' has 1 dimensions \(8,\), the graph expects 2"):
        bert_graph(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_wrong_static_size(mlp_graph):
    with pytest.raises(rf.InputMismatchError, match="size 32 in dimension 1; it was captured as static size 64"):
        mlp_graph(torch.randn(3, 32))
    assert mlp_graph(torch.randn(5, 64)).shape == (5, 32)  # the dynamic batch dimension still varies


def test_missing_or_unknown_keyword(bert_graph):
    ids = torch.randint(0, 128, (2, 8))
    with pytest.raises(rf.InputMismatchError, match=r"do not match the captured signature.*attention_mask"):
        bert_graph(input_ids=ids)
    with pytest.raises(rf.InputMismatchError, match="do not match the captured signature"):
        bert_graph(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)


def test_calibration_batches_that_do_not_fit_the_graph(bert_graph):
    bad = [{"input_ids": torch.randint(0, 128, (2, 8))}] * 2
    with pytest.raises(rf.InputMismatchError, match="attention_mask"):
        rf.optimize(bert_graph, [rf.passes.QuantizeWeights(bits=8)], calibration=bad)


# -- recipes and calibration data -------------------------------------------------------------------------
def test_unknown_pass_in_a_recipe_fails_before_any_work(tmp_path, mlp_graph):
    path = tmp_path / "recipe.yaml"
    path.write_text("passes:\n  - pass: EliminateDeadCode\n  - pass: PruneEverything\n")
    with pytest.raises(rf.RecipeError) as info:
        rf.optimize(mlp_graph, rf.Recipe.load(path))
    assert "PruneEverything" in str(info.value) and "available passes" in str(info.value)


@pytest.mark.parametrize("empty", [[], ()])
def test_empty_calibration_set(mlp_graph, empty):
    with pytest.raises(rf.CalibrationError, match="calibration set is empty"):
        rf.optimize(mlp_graph, [rf.passes.QuantizeWeights(bits=8)], calibration=empty)


@pytest.mark.parametrize("bad_value, word", [(math.nan, "NaN"), (math.inf, "inf"), (-math.inf, "inf")])
def test_non_finite_calibration_data(mlp_graph, bad_value, word):
    x = torch.randn(4, 64)
    before = mlp_graph(x)
    poisoned = x.clone()
    poisoned[1, 7] = bad_value
    with pytest.raises(rf.CalibrationError, match=rf"calibration batch 1, input 'argument 0' contains {word}"):
        rf.optimize(mlp_graph, [rf.passes.QuantizeWeights(bits=8)], calibration=[(x,), (poisoned,)])
    with pytest.raises(rf.CalibrationError, match=word):
        rf.optimize(mlp_graph, [rf.passes.QuantizeWeights(bits=8)], calibration=[(x,)], evaluation=[(poisoned,)])
    torch.testing.assert_close(mlp_graph(x), before, atol=0, rtol=0)  # the input graph is unchanged


# -- output paths that cannot be written ------------------------------------------------------------------
def test_unwritable_export_path_leaves_no_partial_file(tmp_path, mlp_graph):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    with pytest.raises(rf.RarefyError, match="cannot write"):
        rf.export_onnx(mlp_graph, blocker / "out" / "model.onnx")
    assert blocker.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_export_path_that_is_a_directory(tmp_path, mlp_graph):
    (tmp_path / "model.onnx").mkdir()
    with pytest.raises(rf.RarefyError, match="is a directory"):
        rf.export_onnx(mlp_graph, tmp_path / "model.onnx")


def test_failed_write_keeps_the_previous_artifact(tmp_path, mlp_graph, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous artifact")

    def fail_midway(proto, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", fail_midway)
    with pytest.raises(rf.RarefyError, match="cannot write .*No space left"):
        rf.export_onnx(mlp_graph, target)
    assert target.read_bytes() == b"previous artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary file left


def test_unwritable_recipe_and_report_paths(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(rf.RarefyError, match="cannot write"):
        rf.Recipe([rf.passes.EliminateDeadCode()]).save(tmp_path / "file.txt" / "recipe.yaml")
    with pytest.raises(rf.RarefyError, match="cannot write"):
        rf_io.atomic_write_text(tmp_path / "file.txt" / "report.json", "{}")
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]
