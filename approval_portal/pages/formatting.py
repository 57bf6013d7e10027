"""Template filters: relative times, short dates, byte counts, durations.

Dates are short on the page ("01 Dec 10:22") with the exact UTC time in a
title attribute, so a table row stays one line.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from core.models import utcnow

UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def exact(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else "never"


def short(value: datetime | None) -> str:
    """Today: "10:22"; otherwise "01 Dec 10:22" (UTC)."""
    if value is None:
        return "never"
    if value.date() == utcnow().date():
        return value.strftime("%H:%M")
    return value.strftime("%d %b %H:%M")


def duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} days"


def ago(value: datetime | None) -> str:
    """ "3 min ago", "just now", "never"."""
    if value is None:
        return "never"
    seconds = (utcnow() - value).total_seconds()
    if seconds < 0:
        return "in " + duration(-seconds)
    if seconds < 10:
        return "just now"
    return duration(seconds) + " ago"


def since(value: datetime | None) -> str:
    """How long from `value` until now ("4 min"), for idle time and uptime."""
    return duration((utcnow() - value).total_seconds()) if value is not None else "-"


def human_bytes(value: int | None) -> str:
    size = float(value or 0)
    for unit in UNITS:
        if size < 1024 or unit == UNITS[-1]:
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} {UNITS[-1]}"  # not reached


FILTERS: dict[str, Callable[..., Any]] = {
    "exact": exact,
    "short": short,
    "ago": ago,
    "since": since,
    "bytes": human_bytes,
}
