"""Argument checks shared by every pass constructor and by ``rf.optimize``: one wording.

Each check names who was called (the pass or ``rf.optimize``) and the argument, says what it
takes and what came (``QuantizeWeights: group_size must be an integer, got 32.0 (float)``),
and raises ``ArgumentError`` (a ``RecipeError`` and an ``UnsupportedError``). Checks return
the value normalised (``number`` gives a float), so a constructor stores what it checked.
``bool`` is not accepted where a number is: ``bits=True`` is a mistake, not 1.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

from ..ir.errors import ArgumentError

# verification budgets: a lossy pass whose measurements break one is rolled back
BUDGET_KEYS = ("min_sqnr_db", "min_cosine", "max_abs_error")
_BUDGET_RANGES = {"min_sqnr_db": (None, None), "min_cosine": (-1.0, 1.0), "max_abs_error": (0.0, None)}


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _range(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def _in_range(value, low, high, low_open: bool, high_open: bool) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def integer(who: str, name: str, value: Any, *, low: int | None = None, high: int | None = None,
            optional: bool = False) -> int | None:
    """An ``int`` (not a bool, not a float such as 32.0) in ``[low, high]``; None if ``optional``."""
    if value is None and optional:
        return None
    what = f"an integer{_range(low, high, False, False)}" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentError(f"{who}: {name} must be {what}, got {_got(value)}")
    if not _in_range(value, low, high, False, False):
        raise ArgumentError(f"{who}: {name} must be {what}, got {value!r}")
    return int(value)


def number(who: str, name: str, value: Any, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, optional: bool = False) -> float | None:
    """A real number (int or float, not a bool, not NaN) in the given range, as a float."""
    if value is None and optional:
        return None
    what = f"a number{_range(low, high, low_open, high_open)}" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ArgumentError(f"{who}: {name} must be {what}, got {_got(value)}")
    if not _in_range(value, low, high, low_open, high_open):
        raise ArgumentError(f"{who}: {name} must be {what}, got {value!r}")
    return float(value)


def integers(who: str, name: str, value: Any, **limits) -> tuple[int, ...]:
    """A list or tuple of integers, each checked as ``integer`` (e.g. candidate bit widths)."""
    if not isinstance(value, (list, tuple)):
        raise ArgumentError(f"{who}: {name} must be a list of integers, got {_got(value)}")
    return tuple(integer(who, f"{name}[{i}]", v, **limits) for i, v in enumerate(value))


def flag(who: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ArgumentError(f"{who}: {name} must be True or False, got {_got(value)}")
    return value


def choice(who: str, name: str, value: Any, choices) -> Any:
    """One of ``choices`` (compared by equality and type, so 4.0 is not the bit width 4)."""
    if not any(value == c and type(value) is type(c) for c in choices):
        raise ArgumentError(f"{who}: {name} must be one of {', '.join(repr(c) for c in choices)}; "
                            f"got {_got(value)}, an unknown {name}")
    return value


def names(who: str, name: str, value: Any) -> list[str]:
    """A selector (``targets`` / ``ignore``): None, one pattern, or a list of patterns."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ArgumentError(f"{who}: {name} must be a name pattern or a list of them (globs or 're:' regexes), "
                        f"got {_got(value)}")


def budget(who: str, value: Any) -> dict | None:
    """A verification budget: a mapping of known keys to numbers (None or {} for none)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ArgumentError(f"{who}: budget must be a mapping of {', '.join(BUDGET_KEYS)} to numbers, "
                            f"got {_got(value)}")
    known = ", ".join(BUDGET_KEYS)
    for key in value:
        if key not in BUDGET_KEYS:
            raise ArgumentError(f"{who}: unknown budget key {key!r}; a budget takes {known}")
    out = {}
    for key, limit in value.items():
        low, high = _BUDGET_RANGES[key]
        number(who, f"budget[{key!r}]", limit, low=low, high=high)
        out[key] = limit  # as written: the report quotes it
    return out or None
