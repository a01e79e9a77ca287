"""SmoothQuant: fires on three architectures (one GQA), exact at fp32 tolerance, still exports."""
import pytest
import torch

import rarefy as rf
from rarefy.eval.metrics import sqnr_db
from rarefy.ir.errors import PassError, RarefyError, UnsupportedError
from rarefy.passes.quantize_activations import QuantizeActivations
from rarefy.passes.smoothquant import SmoothQuant, smoothing_scales

from _tiny_quant_models import (assert_exports_and_runs_in_ort, batches, first_output, minilm_pydoc_kjv,
                               tiny)  # noqa: E402  (sibling test helper)


@pytest.mark.parametrize("arch", ["llama", "bert", "opt"])
def test_smoothquant_is_exact_and_exports(arch, tmp_path):
    model, data = tiny(arch), batches()
    graph = rf.capture(model, data[0])
    out = rf.optimize(graph, [SmoothQuant(alpha=0.5)], calibration=data, progress=False)
    stats = out.report.rows[-1].stats
    # 1. it fired: q/k/v (and gate/up) into the norms, o into v, in both layers
    assert stats["folded_value"] == 2
    assert stats["folded_layer_norm"] + stats["folded_rms_norm"] == 4
    if arch == "bert":
        assert stats["residual_compensation"] == 4
    # 2. exact: fp32 re-rounding only (tiny models measure ~1e-6)
    held_out = batches(1)[0]
    ref, new = first_output(graph(**held_out)), first_output(out(**held_out))
    torch.testing.assert_close(new, ref, atol=1e-5, rtol=0)
    # 3. still valid: exports, passes the checker, runs in ONNX Runtime (optimisations off)
    assert_exports_and_runs_in_ort(out, ref, held_out, tmp_path / "smooth.onnx")


def test_smoothquant_helps_int8_with_an_outlier_channel():
    model, data = tiny("llama"), batches()
    with torch.no_grad():  # an LLM-style outlier: one hidden channel 40x larger into every q/k/v and gate/up
        for layer in model.model.layers:
            layer.input_layernorm.weight[7] = 40.0
            layer.post_attention_layernorm.weight[7] = 40.0
    graph = rf.capture(model, data[0])
    plain = rf.optimize(graph, [QuantizeActivations()], calibration=data, progress=False)
    smooth = rf.optimize(graph, [SmoothQuant(alpha=0.5), QuantizeActivations()], calibration=data, progress=False)
    # per-token int8 loses the small channels next to a 40x outlier; smoothing moves it into the weights
    assert smooth.report.rows[-1].sqnr_db > plain.report.rows[-1].sqnr_db + 3


def test_smoothing_scales_formula():
    act = torch.tensor([4.0, 1.0, 0.0])
    weight = torch.tensor([[1.0, 4.0, 2.0], [-2.0, 1.0, 1.0]])
    s = smoothing_scales(act, [weight], alpha=0.5)
    # s_j = sqrt(max|X_j|) / sqrt(max|W_j|); a dead channel keeps s = 1
    torch.testing.assert_close(s, torch.tensor([2.0 / 2 ** 0.5, 0.5, 1.0], dtype=torch.float64))


def test_bad_requests_fail_before_any_work():
    graph = rf.capture(tiny("llama"), batches(1)[0])
    with pytest.raises(UnsupportedError, match="alpha"):
        SmoothQuant(alpha=1.5)
    with pytest.raises(RarefyError, match="calibration"):
        rf.optimize(graph, [SmoothQuant()], evaluation=batches(1), progress=False)
    with pytest.raises(PassError, match="SmoothQuant must run before QuantizeActivations"):
        rf.optimize(graph, [QuantizeActivations(), SmoothQuant()], calibration=batches(), progress=False)
    with pytest.raises(UnsupportedError, match="fx dialect"):
        SmoothQuant().check(rf.Graph("onnx", None, graph.signature), None)


def test_skips_have_reasons():
    graph, data = rf.capture(tiny("bert"), batches(1)[0]), batches()
    out = rf.optimize(graph, [SmoothQuant(ignore=["*.layer.1.*"])], calibration=data, progress=False)
    notes = "\n".join(out.report.rows[-1].notes)
    assert "encoder.layer.0.output.dense: not smoothed (its input comes from gelu" in notes
    assert "encoder.layer.1.attention.self.query: not smoothed (matched by ignore)" in notes


@pytest.mark.real
def test_minilm_smoothquant_is_exact_on_real_text():
    graph, calibration, evaluation = minilm_pydoc_kjv()
    # the pipeline raises VerificationError if the rewrite moves outputs beyond SmoothQuant.tolerance
    out = rf.optimize(graph, [SmoothQuant()], calibration=calibration, evaluation=evaluation, progress=False)
    row = out.report.rows[-1]
    assert row.stats["smoothed_linear"] == 30  # q/k/v, o, intermediate in 6 layers; not output.dense (after GELU)
    assert row.max_abs_error <= SmoothQuant.tolerance
    assert sqnr_db(first_output(graph(**evaluation[0])), first_output(out(**evaluation[0]))) > 90
