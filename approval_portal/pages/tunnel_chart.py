"""A small server-rendered SVG chart: tunnels online over the last 24 hours.

Counted from tunnel rows' up and down times (connected_at, closed_at) at
evenly spaced instants; no script, no inline style (colours come from
style.css through class names), so the strict CSP holds.
"""

from __future__ import annotations

from bisect import bisect_right
from datetime import datetime, timedelta

from markupsafe import Markup
from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.orm import Session

from core.models import Device, Tunnel, utcnow

WINDOW = timedelta(hours=24)
SAMPLES = 97  # every 15 minutes, both ends included
MAX_ROWS = 200_000
WIDTH, HEIGHT, PAD = 480, 120, 24


def online_counts(
    session: Session, scope: list[ColumnElement[bool]], now: datetime | None = None
) -> list[tuple[datetime, int]]:
    """(instant, tunnels open at that instant) from 24 h ago until now."""
    now = now or utcnow()
    start = now - WINDOW
    rows = session.execute(
        select(Tunnel.connected_at, Tunnel.closed_at)
        .join(Device, Device.id == Tunnel.device_id)
        .where(
            *scope,
            Tunnel.connected_at <= now,
            or_(Tunnel.closed_at.is_(None), Tunnel.closed_at > start),
        )
        .limit(MAX_ROWS)
    ).all()
    ups = sorted(up for up, _ in rows)
    downs = sorted(down for _, down in rows if down is not None)
    step = WINDOW / (SAMPLES - 1)
    points = []
    for i in range(SAMPLES):
        at = start + step * i
        points.append((at, bisect_right(ups, at) - bisect_right(downs, at)))
    return points


def render(points: list[tuple[datetime, int]]) -> Markup:
    """The chart as an inline <svg> (numbers and fixed words only, so nothing to escape)."""
    peak = max((n for _, n in points), default=0)
    top = max(peak, 1)
    span_x, span_y = WIDTH - 2 * PAD, HEIGHT - 2 * PAD
    last = len(points) - 1 or 1
    coords = [
        (PAD + span_x * i / last, PAD + span_y * (1 - n / top)) for i, (_, n) in enumerate(points)
    ]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    area = f"{PAD},{PAD + span_y} {line} {PAD + span_x},{PAD + span_y}"
    now_count = points[-1][1] if points else 0
    label = f"Tunnels online over the last 24 hours: now {now_count}, peak {peak}"
    base, right = PAD + span_y, PAD + span_x
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{label}">',
        f"<title>{label}</title>",
        f'<line class="axis" x1="{PAD}" y1="{base}" x2="{right}" y2="{base}"/>',
        f'<line class="grid" x1="{PAD}" y1="{PAD}" x2="{PAD + span_x}" y2="{PAD}"/>',
        f'<polygon class="area" points="{area}"/>',
        f'<polyline class="line" points="{line}"/>',
        f'<text class="label" x="{PAD}" y="{PAD - 6}">{peak}</text>',
        f'<text class="label" x="{PAD}" y="{HEIGHT - 6}">24 h ago</text>',
        f'<text class="label end" x="{PAD + span_x}" y="{HEIGHT - 6}">now: {now_count}</text>',
        "</svg>",
    ]
    return Markup("".join(parts))  # noqa: S704 - built from numbers and fixed words only
