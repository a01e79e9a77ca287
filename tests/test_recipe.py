"""rf.Recipe: YAML and JSON files round-trip exactly; bad recipes fail before any work."""
import json

import pytest

import rarefy as rf
from rarefy import recipes
from rarefy.recipe import parse_pass_spec

DOCUMENT = {
    "passes": [
        {"pass": "EliminateDeadCode"},
        {"pass": "QuantizeWeights", "bits": 4, "group_size": 64, "symmetric": False, "ignore": ["*.lm_head"]},
    ],
    "calibration": {"source": "pydoc", "split": "calibration", "batches": 2, "batch_size": 4, "seq_len": 64},
    "evaluation": {"source": "kjv", "split": "evaluation", "batches": 1},
}


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_round_trip_is_exact(tmp_path, suffix):
    recipe = rf.Recipe.from_dict(DOCUMENT)
    path = recipe.save(tmp_path / f"recipe{suffix}")
    loaded = rf.Recipe.load(path)
    assert loaded.to_dict() == DOCUMENT
    assert loaded == recipe
    assert [type(p).__name__ for p in loaded.passes] == ["EliminateDeadCode", "QuantizeWeights"]
    assert loaded.passes[1].bits == 4 and loaded.passes[1].group_size == 64
    loaded.save(tmp_path / f"again{suffix}")  # saving the loaded recipe writes the same bytes
    assert (tmp_path / f"again{suffix}").read_bytes() == path.read_bytes()


def test_json_file_is_plain_json(tmp_path):
    path = rf.Recipe.from_dict(DOCUMENT).save(tmp_path / "r.json")
    assert json.loads(path.read_text()) == DOCUMENT


def test_recipe_from_pass_objects_feeds_optimize_spec():
    recipe = rf.Recipe([rf.passes.QuantizeWeights(bits=8)])
    assert recipe.to_dict() == {"passes": [{"pass": "QuantizeWeights", "bits": 8}]}


def test_bundled_default_recipe_loads():
    recipe = rf.Recipe.load(recipes.path("default"))
    assert [p.spec() for p in recipe.passes] == [{"pass": "EliminateDeadCode"}, {"pass": "QuantizeWeights", "bits": 8}]
    assert recipe.calibration["source"] == "pydoc" and recipe.evaluation["source"] == "kjv"


def test_unknown_pass_names_it_and_the_available_passes(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("passes:\n  - pass: QuantizeWieghts\n    bits: 4\n")
    with pytest.raises(rf.RecipeError) as info:
        rf.Recipe.load(path)
    message = str(info.value)
    assert "QuantizeWieghts" in message and "QuantizeWeights" in message and str(path) in message


def test_unknown_argument_and_invalid_value_name_the_pass():
    with pytest.raises(rf.RecipeError, match="bitz"):
        rf.Recipe([{"pass": "QuantizeWeights", "bitz": 4}])
    with pytest.raises(rf.RecipeError, match=r"passes\[0\] \(QuantizeWeights\).*bits=5"):
        rf.Recipe([{"pass": "QuantizeWeights", "bits": 5}])


@pytest.mark.parametrize("text, problem", [
    ("passes: [", "not valid YAML"),
    ("{}", "'passes' list"),
    ("passes: {pass: EliminateDeadCode}", "must be a list"),
    ("passes: []\nextra: 1", "unknown recipe keys ['extra']"),
    ("passes: []\ncalibration: {source: pydoc, size: 3}", "unknown keys ['size'] in 'calibration'"),
    ("passes: [QuantizeWeights]", "mapping with a 'pass' name"),
])
def test_malformed_recipes_say_what_is_wrong(tmp_path, text, problem):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(rf.RecipeError) as info:
        rf.Recipe.load(path)
    assert problem in str(info.value)


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(rf.RecipeError, match="use .yaml, .yml or .json"):
        rf.Recipe.load(tmp_path / "recipe.toml")
    with pytest.raises(rf.RecipeError, match="cannot read recipe"):
        rf.Recipe.load(tmp_path / "missing.yaml")


def test_parse_pass_spec_reads_yaml_scalars_and_globs():
    spec = parse_pass_spec("QuantizeWeights:bits=4,group_size=64,symmetric=false,targets=[*.mlp.*, re:q_proj$],"
                           "budget={min_sqnr_db: 20}")
    assert spec == {"pass": "QuantizeWeights", "bits": 4, "group_size": 64, "symmetric": False,
                    "targets": ["*.mlp.*", "re:q_proj$"], "budget": {"min_sqnr_db": 20}}
    assert parse_pass_spec("EliminateDeadCode") == {"pass": "EliminateDeadCode"}
    assert parse_pass_spec("X:ignore=*.lm_head,tol=1e-3,group_size=null") == \
        {"pass": "X", "ignore": "*.lm_head", "tol": 1e-3, "group_size": None}
    with pytest.raises(rf.RecipeError, match="is not key=value"):
        parse_pass_spec("QuantizeWeights:bits")
