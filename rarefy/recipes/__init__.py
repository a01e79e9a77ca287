"""Recipes shipped with rarefy (package data): ``default.yaml`` is what ``rarefy optimize``
runs when no ``--recipe`` or ``--pass`` is given. ``path(name)`` finds one by name."""
from __future__ import annotations

from pathlib import Path

from ..ir.errors import RecipeError

RECIPES_DIR = Path(__file__).parent


def path(name: str) -> Path:
    """The file of the bundled recipe ``name`` (``default`` -> ``default.yaml``)."""
    candidate = RECIPES_DIR / f"{name}.yaml"
    if not candidate.is_file():
        available = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise RecipeError(f"no bundled recipe {name!r}; bundled: {available}")
    return candidate
