"""Leg 4: time from the Approve click (the portal's HTTP POST) to the menu prompt.

Each sample is a fresh `ssh partner@relay`: wait for the approval URL, start
the clock, POST the approval form as a logged-in portal user, stop the clock
when the menu prompt arrives in the SSH session. The POST's own latency is
part of the figure, as it is for a technician. No OpenSSH baseline exists.
"""

from __future__ import annotations

from bench.common import LegResult, Scale, Target, Unavailable, percentile
from bench.rly_stack import approve_session, technician
from bench.topology import Topology

TARGETS = [Target("p99", "rly", "<", 1000.0)]


def run(topo: Topology, scale: Scale) -> LegResult:
    """`scale.approvals` approvals one after another; p50 and p99 over all of them."""
    result = LegResult("approval", targets=TARGETS)
    if topo.server is None or topo.approver is None:
        result.unavailable["rly"] = topo.unavailable.get("rly", "rly serve not running")
        return result
    samples: list[float] = []
    try:
        for _ in range(scale.approvals):
            with technician(topo.server) as tech:
                samples.append(approve_session(tech, topo.approver) * 1000)
    except Unavailable as exc:
        result.unavailable["rly"] = str(exc)
        return result
    for name, pct in (("p50", 50), ("p99", 99)):
        metric = result.metric(name, "rly", "ms", higher_is_better=False)
        metric.samples.append(percentile(samples, pct))
    result.metrics[0].raw = samples  # every approval, once
    how = "HTTP POST to the portal" if topo.approver.method == "http" else "database (portal down)"
    result.notes.append(f"{len(samples)} approvals, approved by {how}")
    return result
