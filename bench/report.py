"""Turn leg results into one table (medians, ratios, targets) and a JSON file of raw figures.

Ratios are median ÷ median of the same metric on another path of the same
run, never across runs. A target whose path could not be measured is shown as
"n/a" with the reason: an unmeasured target is not a pass.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
from typing import Any

import asyncssh

from bench.common import LegResult, Metric, Target


def machine() -> dict[str, Any]:
    """CPU model, cores, kernel, OpenSSH, Python and asyncssh versions."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next((ln.split(":", 1)[1].strip() for ln in info if "model name" in ln), cpu)
    except OSError:
        pass
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "openssh": (ssh.stderr or ssh.stdout).strip(),
        "python": sys.version.split()[0],
        "asyncssh": asyncssh.__version__,
    }


def ratio(leg: LegResult, metric: Metric, baseline: str) -> float | None:
    """median(metric) ÷ median(the same metric on `baseline`), if both were measured."""
    other = leg.find(metric.name, baseline)
    if other is None or other is metric or not other.median or metric.median is None:
        return None
    return metric.median / other.median


def verdict(leg: LegResult, target: Target) -> tuple[float | None, str]:
    """(the compared value, PASS/FAIL/n/a: reason) for one target."""
    metric = leg.find(target.metric, target.path)
    if target.metric in leg.failed:
        return None, f"FAIL: {leg.failed[target.metric]}"
    if metric is None or metric.median is None:
        reason = leg.unavailable.get(target.path, "not measured")
        return None, f"n/a: {reason}"
    value = metric.median if target.baseline is None else ratio(leg, metric, target.baseline)
    if value is None:
        return None, f"n/a: {target.baseline} not measured"
    ok = {">=": value >= target.value, "<=": value <= target.value, "<": value < target.value}
    return value, "PASS" if ok[target.op] else "FAIL"


def table(legs: list[LegResult], hops: dict[str, list[str]]) -> str:
    """The human-readable report: one row per metric and path, then targets and notes."""
    head = ("leg", "metric", "path", "median", "unit", "runs", "xdirect", "xreverse")
    rows: list[tuple[str, ...]] = [head]
    for leg in legs:
        for m in leg.metrics:
            vs = ratio(leg, m, "direct")
            vr = ratio(leg, m, "reverse")
            med = "-" if m.median is None else f"{m.median:.3f}"
            rows.append(
                (
                    leg.name,
                    m.name,
                    m.path,
                    med,
                    m.unit,
                    str(len(m.samples)),
                    "-" if vs is None else f"{vs:.2f}x",
                    "-" if vr is None else f"{vr:.2f}x",
                )
            )
    lines = _columns(rows)
    lines += ["", "targets:"]
    for leg in legs:
        for t in leg.targets:
            value, result = verdict(leg, t)
            shown = "" if value is None else (f"{value:.2f}x" if t.baseline else f"{value:.3f}")
            lines.append(f"  {leg.name} {t.metric} {t.path} {t.describe()}: {shown} {result}")
    lines += ["", "unavailable:"] + [
        f"  {leg.name} {path}: {why}" for leg in legs for path, why in leg.unavailable.items()
    ]
    lines += ["", "notes:"] + [f"  {leg.name}: {n}" for leg in legs for n in leg.notes]
    lines += ["", "cipher per hop:"] + [
        f"  {path}: {hop}" for path, hop_list in hops.items() for hop in hop_list
    ]
    return "\n".join(lines)


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]


def to_json(
    legs: list[LegResult], hops: dict[str, list[str]], scale: Any, info: dict[str, Any]
) -> dict[str, Any]:
    """Everything measured, raw samples included, plus medians, ratios and verdicts."""
    out_legs = []
    for leg in legs:
        metrics = [
            {
                **dataclasses.asdict(m),
                "median": m.median,
                "ratio_vs_direct": ratio(leg, m, "direct"),
                "ratio_vs_reverse": ratio(leg, m, "reverse"),
            }
            for m in leg.metrics
        ]
        targets = []
        for t in leg.targets:
            value, result = verdict(leg, t)
            targets.append({**dataclasses.asdict(t), "value": value, "result": result})
        out_legs.append(
            {
                "name": leg.name,
                "metrics": metrics,
                "targets": targets,
                "unavailable": leg.unavailable,
                "failed": leg.failed,
                "notes": leg.notes,
            }
        )
    return {
        "machine": info,
        "cipher_per_hop": hops,
        "scale": dataclasses.asdict(scale),
        "legs": out_legs,
    }
