"""SplitOutliers: fires on three architectures (one GQA, one gated MLP), exact at fp32 tolerance,
still exports; the side branch stays in full precision through the quantization passes."""
import pytest
import torch

import rarefy as rf
from rarefy.eval.metrics import sqnr_db
from rarefy.ir.errors import PassError, RarefyError, UnsupportedError
from rarefy.passes.outliers import SplitOutliers, outlier_units
from rarefy.passes.quantize import QuantizeWeights
from rarefy.passes.quantize_activations import QuantizeActivations

from _tiny_quant_models import (assert_exports_and_runs_in_ort, batches, first_output, minilm_pydoc_kjv,
                               tiny)  # noqa: E402  (sibling test helper)

UNIT = 5  # the planted outlier unit of every MLP


def _up_projections(model, arch: str) -> list[torch.nn.Linear]:
    if arch == "llama":
        return [m for layer in model.model.layers for m in (layer.mlp.gate_proj, layer.mlp.up_proj)]
    if arch == "bert":
        return [layer.intermediate.dense for layer in model.encoder.layer]
    return [layer.fc1 for layer in model.model.decoder.layers]  # opt


def with_outlier_unit(arch: str) -> torch.nn.Module:
    """A tiny model whose MLPs all have one hidden unit ~20x larger than the others (MiniLM-like)."""
    model = tiny(arch)
    with torch.no_grad():
        for linear in _up_projections(model, arch):
            if linear.bias is not None:  # GELU / ReLU of (about) +20 on every token
                linear.bias[UNIT] = 20.0
            else:  # Llama: silu(20 g) * 20 u, large wherever g > 0
                linear.weight[UNIT] *= 20.0
    return model


@pytest.mark.parametrize("arch", ["llama", "bert", "opt"])
def test_split_is_exact_and_exports(arch, tmp_path):
    model, data = with_outlier_unit(arch), batches()
    graph = rf.capture(model, data[0])
    out = rf.optimize(graph, [SplitOutliers()], calibration=data, progress=False)
    row = out.report.rows[-1]
    # 1. it fired: the planted unit, and only it (128 units, max_fraction 0.01 -> at most 1), in both layers
    assert row.stats["split_mlp"] == 2 and row.stats["outlier_units"] == 2
    assert all(d["units"] == [UNIT] for d in row.details.values() if "units" in d)
    assert sum(1 for s in out.sites("linear") if s.name.endswith(".outlier_units")) == (6 if arch == "llama" else 4)
    # 2. exact: the down projection's sum in two parts, fp32 summation order only
    held_out = batches(1)[0]
    ref = first_output(graph(**held_out))
    torch.testing.assert_close(first_output(out(**held_out)), ref, atol=1e-5, rtol=0)
    # 3. still valid: lints, exports, passes the checker, runs in ONNX Runtime (optimisations off)
    out.fx.graph.lint()
    assert_exports_and_runs_in_ort(out, ref, held_out, tmp_path / "split.onnx")


def test_split_helps_per_tensor_int8():
    model, data = with_outlier_unit("bert"), batches()
    graph = rf.capture(model, data[0])
    plain = rf.optimize(graph, [QuantizeActivations(granularity="tensor")], calibration=data, progress=False)
    split = rf.optimize(graph, [SplitOutliers(), QuantizeActivations(granularity="tensor")], calibration=data,
                        progress=False)
    # one scale per tensor spans the 20x unit; without it the other units get ~20x finer steps
    assert split.report.rows[-1].sqnr_db > plain.report.rows[-1].sqnr_db + 6


@pytest.mark.parametrize("quantizer", [QuantizeActivations(), QuantizeWeights(bits=4, group_size=32)])
def test_quantizers_leave_the_side_branch_in_full_precision(quantizer):
    model, data = with_outlier_unit("llama"), batches()
    graph = rf.capture(model, data[0])
    out = rf.optimize(graph, [SplitOutliers(), quantizer], calibration=data, progress=False)
    side = [s for s in out.sites("linear") if s.name.endswith(".outlier_units")]
    assert len(side) == 6 and all(s.nodes[0].target is torch.ops.aten.linear.default for s in side)
    notes = "\n".join(out.report.rows[-1].notes)
    assert "model.layers.0.mlp.down_proj.outlier_units: skipped (kept in full precision by SplitOutliers)" in notes
    stats = out.report.rows[-1].stats
    assert stats.get("w8a8_linear", stats.get("quantized_linear")) == 15  # 7 per layer + lm_head, as unsplit


def test_outlier_units_picks_the_largest_above_the_ratio_capped():
    peak = torch.tensor([1.0, 9.0, 1.2, 30.0, 0.8, 7.0, 1.1, 1.0])  # median 1.05
    assert outlier_units(peak, ratio=6.0, max_fraction=0.5).tolist() == [1, 3, 5]
    assert outlier_units(peak, ratio=6.0, max_fraction=0.25).tolist() == [1, 3]  # cap 2: the two largest
    assert outlier_units(peak, ratio=8.0, max_fraction=0.01).tolist() == [3]  # cap at least one unit
    assert outlier_units(peak, ratio=40.0, max_fraction=0.5).tolist() == []
    relu = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.2, 9.0])  # dead units do not make every live one an outlier
    assert outlier_units(relu, ratio=6.0, max_fraction=0.5).tolist() == [7]
    assert outlier_units(torch.zeros(8), ratio=6.0, max_fraction=0.5).tolist() == []


def test_no_outlier_no_change_and_reasons():
    graph, data = rf.capture(tiny("bert"), batches(1)[0]), batches()
    out = rf.optimize(graph, [SplitOutliers(ratio=1000.0)], calibration=data, progress=False)
    row = out.report.rows[-1]
    assert row.stats["split_mlp"] == 0
    notes = "\n".join(row.notes)
    assert "encoder.layer.0.output.dense: no unit above 1000.0 x the median" in notes
    assert "linears do not read an MLP's hidden units" in notes
    assert "not from linears through activations" in row.details["encoder.layer.0.attention.self.query"]["not_split"]


def test_bad_requests_fail_before_any_work():
    graph = rf.capture(tiny("llama"), batches(1)[0])
    with pytest.raises(UnsupportedError, match="ratio"):
        SplitOutliers(ratio=1.0)
    with pytest.raises(UnsupportedError, match="max_fraction"):
        SplitOutliers(max_fraction=0.0)
    with pytest.raises(RarefyError, match="calibration"):
        rf.optimize(graph, [SplitOutliers()], evaluation=batches(1), progress=False)
    with pytest.raises(PassError, match="SplitOutliers must run before QuantizeActivations"):
        rf.optimize(graph, [QuantizeActivations(), SplitOutliers()], calibration=batches(), progress=False)
    with pytest.raises(UnsupportedError, match="nothing to split"):
        rf.optimize(graph, [SplitOutliers(targets=["*.self_attn.*"])], calibration=batches(), progress=False)
    with pytest.raises(UnsupportedError, match="fx dialect"):
        SplitOutliers().check(rf.Graph("onnx", None, graph.signature), None)


@pytest.mark.real
def test_minilm_split_is_exact_and_helps_per_tensor_int8():
    graph, calibration, evaluation = minilm_pydoc_kjv()
    # the pipeline raises VerificationError if the split moves outputs beyond SplitOutliers.tolerance
    split = rf.optimize(graph, [SplitOutliers(), QuantizeActivations(granularity="tensor")], calibration=calibration,
                        evaluation=evaluation, progress=False)
    plain = rf.optimize(graph, [QuantizeActivations(granularity="tensor")], evaluation=evaluation, progress=False)
    row = split.report.row("SplitOutliers")
    assert row.max_abs_error <= SplitOutliers.tolerance
    # the GELU outlier units of layers 0-3 (max 14-24 against a median ~1.5) go, layer 5's stay (none)
    split_layers = {name.split(".")[2] for name, d in row.details.items() if d.get("units")}
    assert {"0", "1"} <= split_layers and "5" not in split_layers
    ref = first_output(graph(**evaluation[0]))
    gain = sqnr_db(ref, first_output(split(**evaluation[0]))) - sqnr_db(ref, first_output(plain(**evaluation[0])))
    assert gain > 1.0  # measured ~2-3 dB on these windows: the per-tensor scale of FC2 no longer spans the outliers
