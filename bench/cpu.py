"""CPU seconds of process trees between two markers (utime + stime from /proc).

Python speed differs by up to ~3x between VMs of one kind while OpenSSH's
figures barely move, so the bench reports CPU per unit of work for the relay
side (rly serve, or OpenSSH's jump sshd and its per-connection children) and
the device side (rly-client, or the device's `ssh -R`) as ratios that travel
between machines. A process that exits between the two readings is lost, so
only long-lived trees (listeners, ControlMaster connections) are measured.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, utime+stime in seconds) of one process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def tree_cpu(roots: Iterable[int]) -> float:
    """CPU seconds used so far by `roots` and all their descendants (threads included)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (found := _stat(int(entry))) is not None:
            stats[int(entry)] = found
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    total, todo, seen = 0.0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo += children.get(pid, [])
    return total


@dataclass(frozen=True)
class Sides:
    """The process trees of a path's relay side and device side (empty: none on that path)."""

    relay: tuple[int, ...] = ()
    device: tuple[int, ...] = ()

    def read(self) -> tuple[float, float]:
        return tree_cpu(self.relay), tree_cpu(self.device)
