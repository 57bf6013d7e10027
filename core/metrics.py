"""Process-wide counters rendered in the Prometheus text format at /metrics.

Counters are plain integers behind a lock: a check-in or an approval bumps one
number, nothing on the hot path allocates. Each is counted where the event is
decided, after its transaction commits, so a process counts only its own
events (a `--only tracker` node its check-ins, a relay its logins and
sessions); sum over nodes for the fleet. Gauges that live in the database
(open tunnels, live sessions, pending approvals) are read when scraped.
"""

from __future__ import annotations

import threading
from collections import defaultdict

_lock = threading.Lock()
_counters: dict[str, int] = defaultdict(int)
HELP = {
    "rly_checkins_total": "signed device check-ins verified and recorded (tracker)",
    "rly_enrollments_total": "devices enrolled (tracker)",
    "rly_approvals_total": "approval decisions by outcome (portal: approved/rejected; relay: "
    "expired/abandoned)",
    "rly_logins_total": "technician SSH logins by result (relay)",
    "rly_sessions_total": "device sessions opened (relay)",
    "rly_tunnels_opened_total": "device tunnels opened (relay)",
    "rly_refused_requests_total": "SSH requests refused by policy, by port (relay)",
}


def inc(name: str, amount: int = 1, **labels: str) -> None:
    key = name + (
        "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""
    )
    with _lock:
        _counters[key] += amount


def render(gauges: dict[str, float]) -> str:
    """Counters of this process plus the given gauges, as Prometheus text."""
    with _lock:
        counters = dict(_counters)
    lines: list[str] = []
    for name, help_ in HELP.items():
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
        lines += [
            f"{key} {value}" for key, value in sorted(counters.items()) if key.split("{")[0] == name
        ]
    for name, value in sorted(gauges.items()):
        lines += [f"# TYPE {name} gauge", f"{name} {value:g}"]
    return "\n".join(lines) + "\n"
