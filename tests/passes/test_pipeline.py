"""The pass pipeline: order validation, verification, budgets and rollback, reports,
and the promise that the input graph is never modified (foundation, point 4)."""
import json

import pytest
import torch

import rarefy as rf
from rarefy.passes.base import Pass, PassResult, select
import tiny_models as tm


def _graph():
    model, example = tm.build("llama")
    return rf.capture(model, example), example


def _calibration(n=3):
    return [tm.example_inputs("llama", batch=2, seq=8, seed=10 + i) for i in range(n)]


class _Scale(Pass):
    """Test-only lossy pass: multiplies every linear weight by ``factor``."""

    def __init__(self, factor: float = 1.01, *, targets=None, ignore=None, budget=None):
        super().__init__(targets=targets, ignore=ignore, budget=budget)
        self.factor = factor

    def call(self, graph, ctx):
        for site in graph.sites("linear"):
            owner, _, attr = site.tensors["weight"].rpartition(".")
            module = graph.fx.get_submodule(owner)
            setattr(module, attr, torch.nn.Parameter(getattr(module, attr).detach() * self.factor))
        return PassResult(graph, True, {"scaled": len(graph.sites("linear"))})


class _BrokenExact(_Scale):
    """Test-only pass that claims to be exact but is not."""

    exact = True


def test_optimize_returns_new_graph_and_never_mutates_input():
    g, example = _graph()
    before_code = g.fx.code
    before = {k: v.clone() for k, v in g.fx.state_dict().items()}
    out = rf.optimize(g, [rf.passes.QuantizeWeights(bits=8)], calibration=_calibration(), progress=False)
    assert out is not g and g.report is None
    assert g.fx.code == before_code
    assert all(torch.equal(before[k], v) for k, v in g.fx.state_dict().items())
    assert "rarefy.matmul_nbits" in out.fx.code
    assert out.recipe == [{"pass": "QuantizeWeights", "bits": 8}]


LOSSY_CHAINS = {
    "smoothquant+awq": lambda: [rf.passes.SmoothQuant(), rf.passes.QuantizeWeights(bits=4, group_size=16, method="awq")],
    "gptq": lambda: [rf.passes.QuantizeWeights(bits=4, group_size=16, method="gptq")],
    "sparsegpt+w8a8": lambda: [rf.passes.Sparsify(0.5, method="sparsegpt"), rf.passes.QuantizeActivations()],
    "flap+drop": lambda: [rf.passes.PruneChannels(0.25, method="flap"), rf.passes.DropLayers(count=1)],
    # ratio 2 on random weights: a few units per MLP go to the side branch, so the split rewrites weights
    "split_outliers+w8a8": lambda: [rf.passes.SplitOutliers(ratio=2.0, max_fraction=0.05),
                                    rf.passes.QuantizeActivations()],
}


@pytest.mark.parametrize("chain", sorted(LOSSY_CHAINS))
def test_passes_share_weights_with_the_input_but_never_write_them(chain):
    # Graph.copy shares weight tensors (no second copy of the model per pass), which is only
    # sound if no pass writes into a tensor: every family's rewrite must leave the input intact
    g, _ = _graph()
    before = {k: v.clone() for k, v in g.fx.state_dict().items()}
    shared = g.copy()
    assert all(a is b for a, b in zip(g.fx.parameters(), shared.fx.parameters()))
    out = rf.optimize(g, LOSSY_CHAINS[chain](), calibration=_calibration(), progress=False)
    assert out.report.rows[-1].status == "applied"
    assert all(torch.equal(before[k], v) for k, v in g.fx.state_dict().items())


def test_report_measures_each_pass_against_the_original():
    g, _ = _graph()
    out = rf.optimize(g, [rf.passes.EliminateDeadCode(), rf.passes.QuantizeWeights(bits=4, group_size=16)],
                      calibration=_calibration(), progress=False)
    rows = out.report.rows
    assert [r.name for r in rows] == ["<input>", "EliminateDeadCode", "QuantizeWeights"]
    assert rows[1].max_abs_error == 0.0
    q = rows[2]
    assert q.stats["quantized_linear"] == 15
    # int4 group 16 on random weights: SQNR of the logits well above 10 dB, well below exact
    assert 10 < q.sqnr_db < 60 and q.cosine > 0.95
    assert q.param_bytes < rows[1].param_bytes
    table = out.report.table()
    assert "QuantizeWeights(bits=4, group_size=16)" in table and "calibration:" in table and "evaluation:" in table


def test_report_save_and_load_round_trip(tmp_path):
    g, _ = _graph()
    out = rf.optimize(g, [rf.passes.EliminateDeadCode()], calibration=_calibration(), progress=False)
    path = out.report.save(tmp_path / "report.json")
    data = json.loads(path.read_text())
    assert data["passes"][1]["spec"]["pass"] == "EliminateDeadCode"
    loaded = rf.Report.load(path)
    assert [r.name for r in loaded.rows] == [r.name for r in out.report.rows]
    assert loaded.rows[1].sqnr_db == float("inf")


def test_exact_pass_beyond_tolerance_raises():
    g, _ = _graph()
    with pytest.raises(rf.VerificationError, match="_BrokenExact is exact but changed the outputs"):
        rf.optimize(g, [_BrokenExact(1.5)], calibration=_calibration(), progress=False)


def test_budget_rolls_back_a_lossy_pass_and_says_why():
    g, _ = _graph()
    out = rf.optimize(g, [_Scale(1.5, budget={"min_sqnr_db": 40}), rf.passes.EliminateDeadCode()],
                      calibration=_calibration(), progress=False)
    row = out.report.row("_Scale")
    assert row.status.startswith("rolled back: SQNR") and "< budget 40 dB" in row.status
    assert out.report.rows[-1].max_abs_error == 0.0  # the next pass ran on the rolled-back graph
    assert [s["pass"] for s in out.recipe] == ["EliminateDeadCode"]


class _Poison(Pass):
    """Test-only pass: writes ``value`` (NaN or inf) into one weight of the first linear."""

    def __init__(self, value: float = float("nan"), *, targets=None, ignore=None, budget=None):
        super().__init__(targets=targets, ignore=ignore, budget=budget)
        self.value = value

    def call(self, graph, ctx):
        owner, _, attr = graph.sites("linear")[0].tensors["weight"].rpartition(".")
        module = graph.fx.get_submodule(owner)
        weight = getattr(module, attr).detach().clone()
        weight.view(-1)[0] = self.value
        setattr(module, attr, torch.nn.Parameter(weight))
        return PassResult(graph, True, {"poisoned": 1})


class _PoisonExact(_Poison):
    exact = True


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("budget", [None, {"min_sqnr_db": -100}, {"max_abs_error": 1e30}], ids=["none", "sqnr", "abs"])
def test_a_lossy_pass_with_non_finite_outputs_is_rolled_back(value, budget):
    # with or without a budget (and a budget no finite output could break): NaN / inf is never "applied"
    g, _ = _graph()
    out = rf.optimize(g, [_Poison(value, budget=budget), rf.passes.EliminateDeadCode()],
                      calibration=_calibration(), progress=False)
    row = out.report.row("_Poison")
    assert row.status.startswith("rolled back: outputs are not finite"), row.status
    assert [s["pass"] for s in out.recipe] == ["EliminateDeadCode"]
    assert out.report.rows[-1].max_abs_error == 0.0  # the next pass ran on the rolled-back graph
    assert all(torch.isfinite(p).all() for p in out.fx.parameters())


def test_a_pipeline_budget_does_not_let_non_finite_outputs_through():
    g, _ = _graph()
    out = rf.optimize(g, [_Poison()], calibration=_calibration(), budget={"min_cosine": -1.0}, progress=False)
    assert out.report.row("_Poison").status.startswith("rolled back: outputs are not finite")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_an_exact_pass_with_non_finite_outputs_raises(value):
    g, _ = _graph()
    with pytest.raises(rf.VerificationError, match="_PoisonExact is exact but its outputs are not finite"):
        rf.optimize(g, [_PoisonExact(value)], calibration=_calibration(), progress=False)


@pytest.mark.parametrize("make", [
    lambda b: _Scale(budget=b),
    lambda b: rf.passes.QuantizeWeights(bits=8, budget=b),
    lambda b: rf.passes.EliminateDeadCode(budget=b),
    lambda b: rf.passes.SmoothQuant(budget=b),
    lambda b: rf.passes.CompressKV("h2o", token_budget=8, budget=b),
], ids=["test_pass", "QuantizeWeights", "EliminateDeadCode", "SmoothQuant", "CompressKV"])
def test_a_pass_rejects_unknown_budget_keys(make):
    # a misspelt key used to disable the rollback silently
    with pytest.raises(rf.RecipeError, match=r"budget key 'min_cosin'.*min_sqnr_db, min_cosine, max_abs_error"):
        make({"min_cosin": 0.9999})
    with pytest.raises(rf.RecipeError, match=r"budget\['min_sqnr_db'\] must be a number, got '20'"):
        make({"min_sqnr_db": "20"})
    assert make({"min_cosine": 0.9999}).budget == {"min_cosine": 0.9999}


def test_optimize_rejects_unknown_budget_keys():
    g, _ = _graph()
    with pytest.raises(rf.RecipeError, match=r"rf.optimize: unknown budget key 'min_cosin'.*min_cosine"):
        rf.optimize(g, [_Scale()], calibration=_calibration(), budget={"min_cosin": 0.9}, progress=False)
    with pytest.raises(rf.RecipeError, match=r"rf.optimize: budget must be a mapping"):
        rf.optimize(g, [_Scale()], calibration=_calibration(), budget=20, progress=False)


def test_pipeline_wide_budget_keeps_passes_within_it():
    g, _ = _graph()
    out = rf.optimize(g, [_Scale(1.001)], calibration=_calibration(), budget={"min_cosine": 0.99}, progress=False)
    assert out.report.row("_Scale").status == "applied"


def test_order_constraint_is_checked_not_reordered():
    class _First(_Scale):
        must_run_before = ("EliminateDeadCode",)

    g, _ = _graph()
    with pytest.raises(rf.PassError, match="_First must run before EliminateDeadCode"):
        rf.optimize(g, [rf.passes.EliminateDeadCode(), _First()], calibration=_calibration(), progress=False)


def test_failures_name_the_pass_and_the_passes_before_it():
    g, _ = _graph()
    with pytest.raises(rf.UnsupportedError, match=r"QuantizeWeights: .*no linear sites match.*after passes: \['EliminateDeadCode'\]"):
        rf.optimize(g, [rf.passes.EliminateDeadCode(), rf.passes.QuantizeWeights(targets="nothing.*")],
                    calibration=_calibration(), progress=False)


def test_selector_globs_and_regex():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "lm_head"]
    chosen, skipped = select(names, ["*self_attn*", "re:^lm_"], ["*q_proj"])
    assert chosen == ["lm_head"]
    assert skipped == {"model.layers.0.self_attn.q_proj": "matched by ignore",
                       "model.layers.0.mlp.up_proj": "not matched by targets"}


def test_quantize_weights_skips_ignored_with_reason():
    g, _ = _graph()
    out = rf.optimize(g, [rf.passes.QuantizeWeights(bits=8, ignore=["lm_head"])], calibration=_calibration(),
                      progress=False)
    row = out.report.row("QuantizeWeights")
    assert row.stats == {"quantized_linear": 14, "skipped": 1}
    assert row.notes == ["lm_head: skipped (matched by ignore)"]


def test_calibration_statistics_are_block_by_block_and_exact():
    from rarefy.ir.calibration import linear_input_stats

    g, _ = _graph()
    batches = _calibration(2)
    sites = [s for s in g.sites("linear") if s.name.endswith("layers.1.mlp.down_proj")]
    stats = linear_input_stats(g, batches, sites, ("sum_sq", "gram", "abs_max"), progress=False)
    captured = []
    model, _ = tm.build("llama")
    hook = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    for b in batches:
        model(**b)
    hook.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).double()
    s = stats["model.layers.1.mlp.down_proj"]
    assert s["count"].item() == x.shape[0]
    assert torch.allclose(s["sum_sq"], (x * x).sum(0), rtol=1e-6)
    assert torch.allclose(s["gram"], x.T @ x, rtol=1e-6, atol=1e-9)
    assert torch.allclose(s["abs_max"], x.abs().amax(0))


def test_verify_false_needs_no_verification_data():
    g, _ = _graph()
    g.meta.pop("example_inputs")  # nothing to verify on: no evaluation, calibration or example inputs
    with pytest.raises(rf.CalibrationError, match="nothing to verify on"):
        rf.optimize(g, [rf.passes.EliminateDeadCode()], progress=False)
    out = rf.optimize(g, [rf.passes.EliminateDeadCode()], verify=False, progress=False)
    assert out.report.verified is False and out.report.rows[-1].status == "applied"
    assert out.report.rows[-1].max_abs_error is None  # not measured, not made up


def test_a_single_pass_needs_no_list():
    g, example = _graph()
    out = rf.optimize(g, rf.passes.EliminateDeadCode(), progress=False)
    assert [r.name for r in out.report.rows] == ["<input>", "EliminateDeadCode"]
    assert out.report.rows[-1].max_abs_error <= 1e-5  # exact pass, fp32 tolerance
