"""The pipeline driver behind ``rf.optimize``: small on purpose, the work is in passes/."""
from __future__ import annotations

from typing import Any, Sequence

from .ir.errors import PassError
from .ir.graph import Graph
from .passes.base import Pass
from .passes.manager import run_pipeline


def optimize(graph: Graph, passes: Sequence[Pass] | Any = (), calibration: Any = None, evaluation: Any = None,
             verify: bool = True, budget: dict | None = None, progress: bool = True) -> Graph:
    """Run ``passes`` over a copy of ``graph`` and return the result with ``.report``.

    ``passes`` is a pass, a list of passes or a ``rf.Recipe``. ``calibration`` and ``evaluation``
    are lists of batches (tuples or dicts of tensors, as the model is called); without
    ``evaluation`` the last calibration batch is held out for verification. ``budget``
    (``min_sqnr_db`` / ``min_cosine`` / ``max_abs_error``) rolls back a lossy pass that
    breaks it. The input graph is never modified.
    """
    if isinstance(passes, Pass):
        passes = [passes]
    elif hasattr(passes, "passes") and not isinstance(passes, (list, tuple)):
        passes = passes.passes  # a Recipe
    elif not hasattr(passes, "__iter__"):
        raise PassError(f"rf.optimize: passes must be a pass, a list of passes or a rf.Recipe, "
                        f"got {type(passes).__name__}")
    return run_pipeline(graph, list(passes), calibration=calibration, evaluation=evaluation, verify=verify,
                        budget=budget, progress=progress)
