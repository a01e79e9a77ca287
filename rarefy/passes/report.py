"""``rf.Report``: one row per pass — what changed and what it cost.

Each row holds the pass spec, its status (applied, unchanged, rolled back and why), the
counts it reported, its notes (every skip and choice with a reason), and the measurements
taken against the *original* graph on held-out batches: SQNR (dB), cosine similarity,
max abs error, parameter bytes, node count and the pass's wall time. The report also names
the calibration and evaluation data, so a reader knows the two were different.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..ir.io import atomic_write_text


@dataclass
class PassRecord:
    spec: dict
    status: str  # "applied" | "unchanged" | "rolled back: <reason>" | "input"
    stats: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    details: dict = field(default_factory=dict)
    sqnr_db: float | None = None
    cosine: float | None = None
    max_abs_error: float | None = None
    nonfinite: int | None = None  # output values that are NaN or inf where the original's are not
    param_bytes: int = 0
    node_count: int = 0
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return self.spec.get("pass", "?")


@dataclass
class Report:
    rows: list[PassRecord] = field(default_factory=list)
    calibration: str | None = None
    evaluation: str | None = None
    verified: bool = True

    def row(self, name: str) -> PassRecord:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no pass named {name!r} in this report; passes: {[r.name for r in self.rows]}")

    def table(self) -> str:
        head = ["pass", "status", "SQNR dB", "cosine", "max abs err", "params MB", "nodes", "time s", "what changed"]
        lines = [head]
        for r in self.rows:
            lines.append([
                _spec_text(r.spec), r.status, _num(r.sqnr_db, "{:.1f}"), _num(r.cosine, "{:.6f}"),
                _num(r.max_abs_error, "{:.2e}"), f"{r.param_bytes / 1e6:.2f}", str(r.node_count),
                f"{r.seconds:.2f}", ", ".join(f"{k}={v}" for k, v in r.stats.items()),
            ])
        widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
        out = [" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
        out.insert(1, "-+-".join("-" * w for w in widths))
        footer = []
        if self.calibration:
            footer.append(f"calibration: {self.calibration}")
        footer.append(f"evaluation: {self.evaluation}" if self.verified else "verification: off")
        for r in self.rows:
            for note in r.notes[:20]:
                footer.append(f"  [{r.name}] {note}")
            if len(r.notes) > 20:
                footer.append(f"  [{r.name}] ... {len(r.notes) - 20} more notes in report.json")
        return "\n".join(out + footer)

    def to_dict(self) -> dict:
        return {
            "calibration": self.calibration,
            "evaluation": self.evaluation,
            "verified": self.verified,
            "passes": [_clean(asdict(r)) for r in self.rows],
        }

    def save(self, path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @staticmethod
    def load(path) -> "Report":
        data = json.loads(Path(path).read_text())
        rows = [PassRecord(**{k: _unclean(v) for k, v in row.items()}) for row in data.get("passes", [])]
        return Report(rows, data.get("calibration"), data.get("evaluation"), data.get("verified", True))

    def __str__(self) -> str:
        return self.table()


def _spec_text(spec: dict) -> str:
    args = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "pass")
    return f"{spec.get('pass', '?')}({args})"


def _num(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return fmt.format(value)


def _unclean(value: Any):
    return float(value) if value in ("inf", "-inf", "nan") else value


def _clean(value: Any):
    """JSON-safe: inf/nan become strings, tensors become lists, tuples lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
