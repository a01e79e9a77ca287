"""Pass, PassResult, the shared target selector, and pass registration.

A pass is a small class with a declared contract (as in onnx-ir and torch.fx):
``requires(graph, ctx)`` and ``ensures(graph, ctx)`` are no-op checks by default,
``call(graph, ctx) -> PassResult`` does the work on a graph the pass may rewrite in place
(the pipeline hands it a copy). ``__call__`` runs the three and re-raises any failure with
the pass name attached.

Every pass records the arguments it was built with, so ``spec()`` gives
``{"pass": "QuantizeWeights", "bits": 8}`` and ``Pass.from_spec`` rebuilds it: recipes
round-trip. ``targets=`` / ``ignore=`` take qualified-name globs (``"*.mlp.*"``) or
regular expressions prefixed ``re:``; one helper, ``select``, resolves them for every pass.
``budget=`` (the verification budget, keys in ``args.BUDGET_KEYS``) and the selectors are
checked here; each pass checks its own arguments with the helpers in ``args``.
"""
from __future__ import annotations

import fnmatch
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..ir.errors import PassError, RarefyError, RecipeError, UnsupportedError
from . import args

_REGISTRY: dict[str, type["Pass"]] = {}


@dataclass
class PassResult:
    """What a pass did: the graph, whether it changed, counts per rule, and its reasons."""

    graph: Any
    modified: bool
    stats: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # every skip and every choice, with its reason
    details: dict[str, Any] = field(default_factory=dict)  # per-site decisions (scores, bits, ...)


class Pass:
    """Base class of every rarefy pass."""

    exact: ClassVar[bool] = False  # an exact rewrite must match the input within `tolerance`
    tolerance: ClassVar[float] = 1e-5  # max abs error allowed for an exact pass (fp32)
    needs_calibration: ClassVar[bool] = False
    dialects: ClassVar[tuple[str, ...]] = ("fx",)
    must_run_before: ClassVar[tuple[str, ...]] = ()  # pass names that must not precede this one

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if inspect.isabstract(cls) or cls.__dict__.get("call") is None:
            return
        _REGISTRY[cls.__name__] = cls
        init = cls.__init__

        def recording_init(self, *args, **kw):
            if not hasattr(self, "_spec_args"):
                try:
                    bound = inspect.signature(init).bind(self, *args, **kw)
                except TypeError as exc:
                    raise RecipeError(f"{cls.__name__}: {exc}") from exc
                self._spec_args = {k: v for k, v in bound.arguments.items() if k != "self"}
            init(self, *args, **kw)

        recording_init.__signature__ = inspect.signature(init)
        recording_init.__doc__ = init.__doc__
        cls.__init__ = recording_init

    def __init__(self, *, targets: Any = None, ignore: Any = None, budget: dict | None = None):
        self.targets = args.names(self.name, "targets", targets)
        self.ignore = args.names(self.name, "ignore", ignore)
        self.budget = args.budget(self.name, budget)

    @property
    def name(self) -> str:
        return type(self).__name__

    # -- the contract ----------------------------------------------------------------------
    def requires(self, graph, ctx) -> None:
        """Raise if the pass cannot run on ``graph`` (before any work is done)."""

    def call(self, graph, ctx) -> PassResult:
        raise NotImplementedError

    def ensures(self, graph, ctx) -> None:
        """Raise if the rewritten graph breaks what the pass promises."""

    def check(self, graph, ctx) -> None:
        """Everything that can be checked before any pass of the pipeline runs."""
        if graph.dialect not in self.dialects:
            raise UnsupportedError(
                f"{self.name} supports the {'/'.join(self.dialects)} dialect(s), not {graph.dialect}"
            )
        if self.needs_calibration and (ctx is None or ctx.calibration is None):
            raise RarefyError(f"{self.name} needs calibration data: pass calibration=[batches] to rf.optimize")

    def __call__(self, graph, ctx=None) -> PassResult:
        try:
            self.check(graph, ctx)
            self.requires(graph, ctx)
            result = self.call(graph, ctx)
            self.ensures(result.graph, ctx)
        except RarefyError as exc:
            if str(exc).startswith(self.name):
                raise
            raise type(exc)(f"{self.name}: {exc}") from exc
        except Exception as exc:
            raise PassError(f"{self.name} failed: {type(exc).__name__}: {exc}") from exc
        if result.modified:
            result.graph.invalidate()
        return result

    # -- selection ----------------------------------------------------------------------------
    def select(self, names: list[str]) -> tuple[list[str], dict[str, str]]:
        """Split names into (selected, {skipped name: reason}) by ``targets`` and ``ignore``."""
        return select(names, self.targets, self.ignore)

    # -- specs and recipes ----------------------------------------------------------------------
    def spec(self) -> dict:
        return {"pass": self.name, **{k: _jsonable(v) for k, v in getattr(self, "_spec_args", {}).items()}}

    @staticmethod
    def from_spec(spec: dict) -> "Pass":
        if not isinstance(spec, dict) or "pass" not in spec:
            raise RecipeError(f"a pass spec is a mapping with a 'pass' key, got {spec!r}")
        args = {k: v for k, v in spec.items() if k != "pass"}
        return pass_class(spec["pass"])(**args)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in getattr(self, "_spec_args", {}).items())
        return f"{self.name}({args})"


def pass_class(name: str) -> type[Pass]:
    if name not in _REGISTRY:
        raise RecipeError(f"unknown pass {name!r}; available passes: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def registered_passes() -> dict[str, type[Pass]]:
    return dict(sorted(_REGISTRY.items()))


def select(names: list[str], targets: list[str], ignore: list[str]) -> tuple[list[str], dict[str, str]]:
    """The one selector: ``targets`` (all when empty) minus ``ignore``; globs or ``re:`` patterns."""
    chosen, skipped = [], {}
    for name in names:
        if targets and not any(_matches(p, name) for p in targets):
            skipped[name] = "not matched by targets"
        elif any(_matches(p, name) for p in ignore):
            skipped[name] = "matched by ignore"
        else:
            chosen.append(name)
    return chosen, skipped


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    return value
