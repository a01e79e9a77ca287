"""Recipes: a pipeline of passes written down as YAML or JSON, and read back exactly.

A recipe document is a mapping::

    passes:                       # required: the passes, in the order they run
      - pass: EliminateDeadCode
      - pass: QuantizeWeights
        bits: 8
    calibration:                  # optional: the text the `rarefy` command calibrates on
      source: pydoc
      split: calibration
      batches: 4
    evaluation:                   # optional: the text it verifies on
      source: kjv
      split: evaluation
      batches: 2
    source: BertModel             # optional: the model it was run on (artifacts record it)

Each pass entry is ``Pass.spec()``: the pass's class name and the arguments it was built
with, so ``Recipe.load(path).to_dict()`` equals the document that was saved. A pass name
that is not registered, or an argument a pass does not take, raises ``RecipeError`` naming
it (and the passes that exist) before any work is done. ``parse_pass_spec`` reads the
``--pass NAME:key=value,...`` form of the command line.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from .ir.errors import RarefyError, RecipeError
from .ir.io import atomic_write_text
from .passes.base import Pass

DATA_SECTIONS = ("calibration", "evaluation")
DATA_KEYS = ("source", "split", "batches", "batch_size", "seq_len")
TOP_LEVEL_KEYS = ("passes", "source") + DATA_SECTIONS
YAML_SUFFIXES = (".yaml", ".yml")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class Recipe:
    """An ordered list of passes, plus the data sections the `rarefy` command reads."""

    def __init__(self, passes: Iterable[Pass | dict] = (), calibration: dict | None = None,
                 evaluation: dict | None = None, source: str | None = None):
        self.passes = [_as_pass(p, i) for i, p in enumerate(passes)]
        self.calibration = _data_section("calibration", calibration)
        self.evaluation = _data_section("evaluation", evaluation)
        self.source = source

    # -- documents ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, document: Any) -> "Recipe":
        if isinstance(document, list):  # a bare list of pass specs
            document = {"passes": document}
        if not isinstance(document, dict) or "passes" not in document:
            raise RecipeError("a recipe is a mapping with a 'passes' list, "
                              "e.g. {'passes': [{'pass': 'QuantizeWeights'}]}")
        unknown = sorted(set(document) - set(TOP_LEVEL_KEYS))
        if unknown:
            raise RecipeError(f"unknown recipe keys {unknown}; a recipe has {list(TOP_LEVEL_KEYS)}")
        if not isinstance(document["passes"], list):
            raise RecipeError(f"'passes' must be a list of pass specs, got {type(document['passes']).__name__}")
        return cls(document["passes"], document.get("calibration"), document.get("evaluation"),
                   document.get("source"))

    def to_dict(self) -> dict:
        document: dict = {"passes": [p.spec() for p in self.passes]}
        for name in DATA_SECTIONS:
            if getattr(self, name):
                document[name] = dict(getattr(self, name))
        if self.source is not None:
            document["source"] = self.source
        return document

    # -- files -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path) -> "Recipe":
        """Read a recipe from ``.yaml`` / ``.yml`` / ``.json`` (chosen by the suffix)."""
        path = Path(path)
        fmt = _format_of(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from exc
        try:
            document = yaml.safe_load(text) if fmt == "yaml" else json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise RecipeError(f"recipe {path} is not valid {fmt.upper()}: {_first_line(exc)}") from exc
        try:
            return cls.from_dict(document)
        except RecipeError as exc:
            raise RecipeError(f"recipe {path}: {exc}") from exc

    def save(self, path) -> Path:
        """Write the recipe atomically, as YAML or JSON by the suffix of ``path``."""
        path = Path(path)
        document = self.to_dict()
        if _format_of(path) == "yaml":
            text = yaml.safe_dump(document, sort_keys=False, default_flow_style=False)
        else:
            text = json.dumps(document, indent=2) + "\n"
        return atomic_write_text(path, text)

    def __eq__(self, other) -> bool:
        return isinstance(other, Recipe) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"rf.Recipe({self.passes!r})"


def parse_pass_spec(text: str) -> dict:
    """``"QuantizeWeights:bits=4,group_size=64"`` -> ``{"pass": "QuantizeWeights", "bits": 4, ...}``.

    Values are YAML scalars (``4``, ``0.5``, ``true``, ``null``, ``[a, b]``); a value YAML
    cannot read (a glob such as ``*.mlp.*``) stays a string. Commas inside ``[...]`` or
    ``{...}`` do not split arguments.
    """
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise RecipeError(f"--pass {text!r}: give a pass name, e.g. QuantizeWeights:bits=4")
    spec: dict = {"pass": name}
    for item in _split_top_level(rest):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise RecipeError(f"--pass {text!r}: {item!r} is not key=value")
        spec[key.strip()] = _scalar(value.strip())
    return spec


# -- helpers ---------------------------------------------------------------------------------
def _as_pass(item: Pass | dict, index: int) -> Pass:
    if isinstance(item, Pass):
        return item
    if not isinstance(item, dict) or not isinstance(item.get("pass"), str):
        raise RecipeError(f"passes[{index}] must be a mapping with a 'pass' name, got {item!r}")
    try:
        return Pass.from_spec(item)
    except RecipeError as exc:
        raise RecipeError(f"passes[{index}]: {exc}") from exc
    except (RarefyError, TypeError, ValueError) as exc:  # the pass rejected its arguments
        raise RecipeError(f"passes[{index}] ({item['pass']}): {exc}") from exc


def _data_section(name: str, section: dict | None) -> dict | None:
    if section is None:
        return None
    if not isinstance(section, dict):
        raise RecipeError(f"'{name}' must be a mapping of {list(DATA_KEYS)}, got {section!r}")
    unknown = sorted(set(section) - set(DATA_KEYS))
    if unknown:
        raise RecipeError(f"unknown keys {unknown} in '{name}'; it takes {list(DATA_KEYS)}")
    return dict(section)


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in YAML_SUFFIXES:
        return "yaml"
    if suffix == ".json":
        return "json"
    raise RecipeError(f"recipe {path}: unknown format {suffix or '(no suffix)'}; use .yaml, .yml or .json")


def _split_top_level(text: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        items.append(current)
    return [i.strip() for i in items if i.strip()]


def _scalar(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:  # globs such as *.mlp.* read as YAML aliases: keep them as strings
        if text.startswith("[") and text.endswith("]"):
            return [_scalar(item) for item in _split_top_level(text[1:-1])]
        return text
    if isinstance(value, str) and _NUMBER.fullmatch(value):  # YAML 1.1 reads 1e-3 as a string
        return float(value)
    if isinstance(value, dict) and not text.startswith("{"):  # "re:a: b" is a string, not a mapping
        return text
    return value


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
