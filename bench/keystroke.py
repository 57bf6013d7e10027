"""Leg 2: keystroke round trip: one byte typed, echoed by the device, seen again.

ssh runs with `-tt` on a local PTY that we put in raw mode ourselves, so no
local echo can answer for the device. The device runs
`stty raw -echo; printf READY; exec cat`: its PTY passes each byte to `cat`
at once and `cat` writes it back. Each keystroke waits for its echo before the
next, so this is latency, not throughput. p50 and p99 per run; the table
shows the median over runs and the JSON keeps every round trip. CPU seconds
per 1,000 keystrokes of each path's relay side and device side (bench.cpu)
are read from just after READY to the last echo.
"""

from __future__ import annotations

import contextlib
import os
import pty
import subprocess
import time
import tty

from bench.common import LegResult, Scale, Target, Unavailable, interleaved, percentile
from bench.openssh import SshPath
from bench.stream import read_until
from bench.topology import Topology

ECHO_COMMAND = "stty raw -echo; printf READY; exec cat"
RELAY_CPU = "relay CPU s/1k keys"
DEVICE_CPU = "device CPU s/1k keys"
TARGETS = [
    Target("p50", "rly", "<=", 1.0, "reverse"),
    Target("p99", "rly", "<=", 1.5, "reverse"),
    Target(RELAY_CPU, "rly", "<=", 2.0, "reverse"),
]


def run(topo: Topology, scale: Scale) -> LegResult:
    """Measure round trips on every available path, interleaved."""
    result = LegResult("keystroke", targets=TARGETS, unavailable=dict(topo.unavailable))
    result.notes.append(f"{scale.keystrokes} keystrokes per run, raw mode, device echoes with cat")
    for _, name in interleaved(scale.runs, list(topo.paths)):
        if name in result.unavailable:
            continue
        path = topo.paths[name]
        try:
            rtts, (relay_cpu, device_cpu) = round_trips(path, scale.keystrokes)
        except Unavailable as exc:
            result.unavailable[name] = str(exc)
            continue
        per_1k = 1000 / len(rtts)
        if path.sides.relay:
            result.metric(RELAY_CPU, name, "s", higher_is_better=False).samples.append(
                relay_cpu * per_1k
            )
        if path.sides.device:
            result.metric(DEVICE_CPU, name, "s", higher_is_better=False).samples.append(
                device_cpu * per_1k
            )
        p50 = result.metric("p50", name, "ms", higher_is_better=False)
        p50.samples.append(percentile(rtts, 50))
        p50.raw += rtts
        result.metric("p99", name, "ms", higher_is_better=False).samples.append(
            percentile(rtts, 99)
        )
    return result


def round_trips(path: SshPath, count: int) -> tuple[list[float], tuple[float, float]]:
    """`count` keystroke round trips in milliseconds through `path`, and the CPU seconds
    its relay side and device side used meanwhile."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    proc = subprocess.Popen(
        path.command(ECHO_COMMAND, tty=True),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    try:
        read_until(master, b"READY", timeout=60, approve=path.approve)
        relay0, device0 = path.sides.read()
        rtts = [_one(master) for _ in range(count)]
        relay1, device1 = path.sides.read()
        return rtts, (relay1 - relay0, device1 - device0)
    finally:
        proc.kill()
        proc.wait()
        with contextlib.suppress(OSError):
            os.close(master)


def _one(fd: int) -> float:
    start = time.perf_counter()
    os.write(fd, b"x")
    read_until(fd, b"x", timeout=5)
    return (time.perf_counter() - start) * 1000
