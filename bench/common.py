"""Shared types for the benchmark legs: sizes, results, targets and statistics.

A leg returns a `LegResult` of raw samples; only `report.py` turns samples
into medians, ratios and pass/fail, so the JSON always keeps what was
measured and never a number derived twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

KiB = 1024
MiB = 1024 * KiB
Op = Literal[">=", "<=", "<"]


class Unavailable(Exception):
    """A leg or path cannot be measured here; str(exc) is the one-line reason shown."""


@dataclass(frozen=True)
class Scale:
    """How big each leg is. `SMOKE` only proves the scripts still run."""

    bulk_bytes: int
    keystrokes: int
    runs: int
    connects: int
    approvals: int
    idle_counts: tuple[int, ...]
    idle_window: float
    checkins: int
    smoke: bool


FULL = Scale(
    bulk_bytes=256 * MiB,
    keystrokes=1000,
    runs=5,
    connects=10,
    approvals=100,
    idle_counts=(1000, 5000, 10000),
    idle_window=60.0,
    checkins=20000,
    smoke=False,
)
SMOKE = Scale(
    bulk_bytes=1 * MiB,
    keystrokes=20,
    runs=1,
    connects=2,
    approvals=3,
    idle_counts=(20,),
    idle_window=2.0,
    checkins=200,
    smoke=True,
)


@dataclass
class Metric:
    """One measured quantity on one path: one sample per run (plus optional raw data).

    The table shows the median of `samples`. `raw` keeps finer data, e.g. every
    keystroke round trip, for the JSON only.
    """

    name: str
    path: str
    unit: str
    higher_is_better: bool
    samples: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return median(self.samples) if self.samples else None


@dataclass(frozen=True)
class Target:
    """A goal from the issue: `metric` on `path` `op` `value`, or `op` value x `baseline`."""

    metric: str
    path: str
    op: Op
    value: float
    baseline: str | None = None

    def describe(self) -> str:
        if self.baseline is None:
            return f"{self.op} {self.value:g}"
        return f"{self.op} {self.value:g}x {self.baseline}"


@dataclass
class LegResult:
    """Everything one leg measured, what it could not measure, and why."""

    name: str
    metrics: list[Metric] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # metric -> why it has no figure
    notes: list[str] = field(default_factory=list)

    def metric(self, name: str, path: str, unit: str, *, higher_is_better: bool) -> Metric:
        """The metric (name, path), created on first use so runs append to one object."""
        for m in self.metrics:
            if m.name == name and m.path == path:
                return m
        created = Metric(name, path, unit, higher_is_better)
        self.metrics.append(created)
        return created

    def find(self, name: str, path: str) -> Metric | None:
        return next((m for m in self.metrics if m.name == name and m.path == path), None)


def median(values: list[float]) -> float:
    """The median (mean of the middle two for an even count)."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("median of no values")
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile: the smallest value with at least pct% of values at or below it."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = max(math.ceil(pct / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def interleaved(runs: int, paths: list[str]) -> list[tuple[int, str]]:
    """(run, path) pairs back to back: A B C, C B A, A B C … so drift hits every path alike."""
    order: list[tuple[int, str]] = []
    for run in range(runs):
        sequence = paths if run % 2 == 0 else list(reversed(paths))
        order += [(run, p) for p in sequence]
    return order
