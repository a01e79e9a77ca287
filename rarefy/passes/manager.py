"""The pipeline: validate the written order, run each pass on a copy, verify, report.

Verification runs the graph after every pass on held-out batches and compares its
floating outputs with the *original* graph's: SQNR (dB), cosine similarity and max abs
error. Outputs that turn NaN or inf where the original's are finite fail every pass: an
exact pass raises, a lossy one is rolled back, budget or not. An exact pass beyond its
tolerance raises ``VerificationError``; a lossy pass that breaks its budget
(``{"min_sqnr_db": 20, "min_cosine": 0.99, "max_abs_error": ...}``, set on the pass or for
the whole pipeline) is rolled back and the report says why. Ordering
constraints (``Pass.must_run_before``) are checked against the order the user wrote and
never used to reorder it.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..eval.metrics import cosine, max_abs_error, sqnr_db
from ..ir.calibration import Calibration
from ..ir.errors import CalibrationError, PassError, RarefyError, VerificationError
from ..ir.graph import check_graph
from . import args
from .base import Pass
from .report import PassRecord, Report

log = logging.getLogger(__name__)


@dataclass
class PassContext:
    """What passes may read: calibration data, progress preference, a cache for statistics."""

    calibration: Calibration | None = None
    progress: bool = True
    cache: dict = field(default_factory=dict)

    @property
    def batches(self) -> list:
        if self.calibration is None:
            raise CalibrationError("this pass needs calibration data: pass calibration=[batches] to rf.optimize")
        return self.calibration.batches


def validate_order(passes: list[Pass]) -> None:
    """Reject a pipeline whose written order breaks a pass's ``must_run_before`` constraint."""
    for i, p in enumerate(passes):
        if not isinstance(p, Pass):
            raise PassError(f"passes[{i}] is {type(p).__name__}, not a rarefy pass (see `rarefy passes`)")
        for earlier in passes[:i]:
            if earlier.name in p.must_run_before:
                raise PassError(
                    f"{p.name} must run before {earlier.name}, but the pipeline lists {earlier.name} first "
                    f"(position {passes.index(earlier)}) and {p.name} at position {i}; reorder the passes"
                )


def run_pipeline(graph, passes: list[Pass], calibration=None, evaluation=None, verify: bool = True,
                 budget: dict | None = None, progress: bool = True):
    """Run ``passes`` over a copy of ``graph``; return the new graph with ``.report`` set."""
    check_graph(graph, "rf.optimize")
    args.flag("rf.optimize", "verify", verify)
    args.flag("rf.optimize", "progress", progress)
    passes = list(passes)
    validate_order(passes)
    budget = args.budget("rf.optimize", budget)
    calib = Calibration(calibration, getattr(calibration, "description", "user-provided batches")) \
        if calibration is not None else None
    # verify=False needs no data to verify on (the held-out split stays as it was: same calibration)
    held_out, eval_text = _evaluation_batches(graph, calib, evaluation) if verify else ([], None)
    if calib is not None and evaluation is None and len(calib) >= 2:
        calib, _ = calib.split_held_out()
    ctx = PassContext(calibration=calib, progress=progress)
    for p in passes:  # everything checkable is checked before any work is done
        p.check(graph, ctx)
    report = Report(calibration=calib.description if calib else None, evaluation=eval_text, verified=verify)
    reference = [graph.run_batch(b) for b in held_out] if verify else None
    # each pass works on its own copy, so the input (and the last accepted graph, kept for a
    # rollback) is never mutated; one copy of the model is alive at a time, not two
    current = graph
    report.rows.append(_measure({"pass": "<input>"}, "input", current, reference, held_out, 0.0))
    for i, p in enumerate(passes):
        start = time.perf_counter()
        try:
            result = p(current.copy(), ctx)
        except RarefyError as exc:
            ran = [q.name for q in passes[:i]]
            raise type(exc)(f"{exc} (after passes: {ran or 'none'})") from exc
        seconds = time.perf_counter() - start
        status = "applied" if result.modified else "unchanged"
        record = _measure(p.spec(), status, result.graph, reference, held_out, seconds)
        record.stats, record.notes, record.details = dict(result.stats), list(result.notes), dict(result.details)
        if verify and p.exact and record.nonfinite:
            raise VerificationError(
                f"{p.name} is exact but its outputs are not finite: {_nonfinite_text(record)} on {eval_text}"
            )
        if verify and p.exact and record.max_abs_error is not None and not record.max_abs_error <= p.tolerance:
            raise VerificationError(
                f"{p.name} is exact but changed the outputs by {record.max_abs_error:.3e} "
                f"(tolerance {p.tolerance:.0e}) on {eval_text}"
            )
        broken = _broken_budget(p.budget or budget, record) if verify and not p.exact else None
        if broken:
            record.status = f"rolled back: {broken}"
            record.param_bytes, record.node_count = current.parameter_bytes(), current.node_count()
            log.warning("%s rolled back: %s", p.name, broken)
        else:
            current = result.graph
            current.recipe = current.recipe + [p.spec()]
        report.rows.append(record)
    if current is graph:  # nothing applied: still hand back a new graph, never the input itself
        current = graph.copy()
    current.report = report
    return current


def _measure(spec, status, graph, reference, held_out, seconds) -> PassRecord:
    record = PassRecord(spec=spec, status=status, param_bytes=graph.parameter_bytes(),
                        node_count=graph.node_count(), seconds=seconds)
    if reference is None:
        return record
    ref, out = [], []
    record.nonfinite = 0
    for batch, ref_outputs in zip(held_out, reference):
        outputs = graph.run_batch(batch)
        for r, o in zip(ref_outputs, outputs):
            if r.is_floating_point():
                ref.append(r.detach().reshape(-1).double())
                out.append(o.detach().reshape(-1).double())
                record.nonfinite += int((~torch.isfinite(out[-1]) & torch.isfinite(ref[-1])).sum())
    if ref:
        ref_all, out_all = torch.cat(ref), torch.cat(out)
        record.sqnr_db = float(sqnr_db(ref_all, out_all))
        record.cosine = float(cosine(ref_all, out_all))
        record.max_abs_error = float(max_abs_error(ref_all, out_all))
    return record


def _evaluation_batches(graph, calib: Calibration | None, evaluation) -> tuple[list, str]:
    if evaluation is not None:
        checked = Calibration(evaluation, getattr(evaluation, "description", "user-provided evaluation batches"))
        return checked.batches, checked.description
    if calib is not None and len(calib) >= 2:
        return calib.batches[-1:], f"the last calibration batch, held out of calibration ({calib.description})"
    args, kwargs = graph.meta.get("example_inputs") or ((), {})
    if bool(args) != bool(kwargs):  # a batch is positional or keyword, not both
        return [args or kwargs], "the capture's example inputs (no held-out data given)"
    raise CalibrationError(
        "nothing to verify on: give evaluation=[batches] (or calibration with at least two batches), "
        "or pass verify=False"
    )


def _nonfinite_text(record: PassRecord) -> str:
    return f"{record.nonfinite} output values are NaN or inf where the original's are finite"


def _broken_budget(budget: dict | None, record: PassRecord) -> str | None:
    if record.nonfinite:  # checked with or without a budget: a budget's comparisons are False for NaN
        return f"outputs are not finite ({_nonfinite_text(record)})"
    if not budget or record.sqnr_db is None:
        return None
    if "min_sqnr_db" in budget and not record.sqnr_db >= budget["min_sqnr_db"]:
        return f"SQNR {record.sqnr_db:.1f} dB < budget {budget['min_sqnr_db']} dB"
    if "min_cosine" in budget and not record.cosine >= budget["min_cosine"]:
        return f"cosine {record.cosine:.5f} < budget {budget['min_cosine']}"
    if "max_abs_error" in budget and not record.max_abs_error <= budget["max_abs_error"]:
        return f"max abs error {record.max_abs_error:.3e} > budget {budget['max_abs_error']}"
    if math.isnan(record.sqnr_db):
        return "outputs are NaN"
    return None
