"""Every pass checks its arguments' types and ranges in its constructor (issue 13, point 3).

A float where an integer belongs (``group_size=64.0``), a string where a number belongs
(``sparsity="0.5"``) or a bool where a number belongs raised a raw TypeError deep inside the
pass, or was silently accepted (``bits=4.0`` passed ``4.0 in (2, 3, 4, 8)``). Each case must
raise rarefy's ArgumentError (a RecipeError) whose message names the pass and the argument.
"""
import pytest

import rarefy as rf
from rarefy.ir.errors import ArgumentError
from rarefy.passes import args

P = rf.passes

BAD = [  # (constructor, kwargs, "Pass: argument")
    (P.QuantizeWeights, {"bits": 4.0}, "QuantizeWeights: bits"),
    (P.QuantizeWeights, {"bits": 4, "group_size": 64.0}, "QuantizeWeights: group_size"),
    (P.QuantizeWeights, {"symmetric": "no"}, "QuantizeWeights: symmetric"),
    (P.QuantizeWeights, {"method": "gptq", "damp": "0.01"}, "QuantizeWeights: damp"),
    (P.QuantizeWeights, {"act_order": 1}, "QuantizeWeights: act_order"),
    (P.QuantizeActivations, {"bits": "8"}, "QuantizeActivations: bits"),
    (P.SmoothQuant, {"alpha": "0.5"}, "SmoothQuant: alpha"),
    (P.SplitOutliers, {"ratio": True}, "SplitOutliers: ratio"),
    (P.MixedPrecision, {"avg_bits": "4"}, "MixedPrecision: avg_bits"),
    (P.MixedPrecision, {"avg_bits": 4, "group_size": 64.0}, "MixedPrecision: group_size"),
    (P.MixedPrecision, {"avg_bits": 4, "candidates": 4}, "MixedPrecision: candidates"),
    (P.Sparsify, {"sparsity": "0.5"}, "Sparsify: sparsity"),
    (P.Sparsify, {"sparsity": 1.5}, "Sparsify: sparsity"),
    (P.Sparsify, {"pattern": 24}, "Sparsify: pattern"),
    (P.PruneHeads, {"fraction": "0.5"}, "PruneHeads: fraction"),
    (P.PruneChannels, {"count": 2.5}, "PruneChannels: count"),
    (P.PruneChannels, {"method": None}, "PruneChannels: method"),
    (P.DropLayers, {"count": 1.0}, "DropLayers: count"),
    (P.DropLayers, {"fraction": "0.25"}, "DropLayers: fraction"),
    (P.DropLayers, {"count": 1, "iterative": "yes"}, "DropLayers: iterative"),
    (P.PruneTokens, {"keep": "0.5", "after_layer": 1}, "PruneTokens: keep"),
    (P.PruneTokens, {"keep": 0.5, "after_layer": 1.0}, "PruneTokens: after_layer"),
    (P.MergeTokens, {"r": 1.5}, "MergeTokens: r"),
    (P.CompressKV, {"method": "quantize", "bits": 4.0}, "CompressKV: bits"),
    (P.CompressKV, {"method": "quantize", "bits": 4, "group_size": "64"}, "CompressKV: group_size"),
    (P.CompressKV, {"method": "h2o", "token_budget": 8.0}, "CompressKV: token_budget"),
    (P.CompressKV, {"method": "h2o", "token_budget": 8, "sinks": 2.0}, "CompressKV: sinks"),
    (P.EliminateDeadCode, {"targets": 3}, "EliminateDeadCode: targets"),
    (P.QuantizeWeights, {"ignore": ["lm_head", 0]}, "QuantizeWeights: ignore"),
]


@pytest.mark.parametrize("make, kwargs, names", BAD, ids=[f"{n}={k[n.split(': ')[1]]!r}" for _, k, n in BAD])
def test_a_bad_argument_is_a_clear_error_naming_the_pass_and_the_argument(make, kwargs, names):
    with pytest.raises(rf.RecipeError, match=f"^{names} must be ") as info:
        make(**kwargs)
    assert isinstance(info.value, ArgumentError) and isinstance(info.value, rf.UnsupportedError)


def test_every_registered_pass_is_covered():
    covered = {make.__name__ for make, _, _ in BAD}
    assert covered == {name for name in rf.passes.registered_passes() if not name.startswith("_")}


def test_good_arguments_still_build_and_are_normalised():
    assert P.QuantizeWeights(bits=4, group_size=64).group_size == 64
    assert P.Sparsify(sparsity=1 / 2).sparsity == 0.5
    assert P.SmoothQuant(alpha=1).alpha == 1.0
    assert args.integer("X", "n", None, optional=True) is None
    with pytest.raises(ArgumentError, match=r"^X: n must be an integer >= 1 or None, got 0$"):
        args.integer("X", "n", 0, low=1, optional=True)
    with pytest.raises(ArgumentError, match=r"^X: p must be a number in \(0, 1\], got nan \(float\)$"):
        args.number("X", "p", float("nan"), low=0, high=1, low_open=True)
