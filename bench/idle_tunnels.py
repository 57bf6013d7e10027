"""Leg 5: idle device tunnels: relay RSS per tunnel, keepalive CPU, and a reconnect storm.

Devices are rows created straight in the database (accepted, one ed25519 key
each) and held by `bench.sim_device` processes. At each level (1,000, 5,000,
10,000) we wait until all are up, then read the relay's RSS from
/proc/<pid>/status (minus the RSS before any tunnel) and its CPU from
/proc/<pid>/stat over an idle window with the default keepalive interval
(rly-client maps 30 s x 3 to a probe after 40.5 s of silence, the relay
answers), so the window spans more than one keepalive round. At the last
level the relay is SIGKILLed and restarted on the same ports; the storm time
runs from the kill until every device has reconnected once more.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from bench.common import KiB, LegResult, Scale, Target, Unavailable
from bench.rly_stack import create_devices, start_server
from bench.sim_device import KEEPALIVE
from tests.support.procs import ManagedProcess
from tests.support.rly_server import RlyServer

PER_PROCESS = 1250
STORM_LIMIT = 300.0  # give up waiting (the target is 60 s)


def targets(top: int) -> list[Target]:
    """The issue's goals, which name the top level (10,000 tunnels at full scale)."""
    return [
        Target(f"RSS per tunnel @{top}", "rly", "<=", 25.0),
        Target(f"keepalive CPU @{top}", "rly", "<=", 2.0),  # issue 10: <= 2% of a core
        Target(f"reconnect storm @{top}", "rly", "<=", 60.0),
    ]


class Fleet:
    """Simulated devices in several processes; counts come from their status files."""

    def __init__(self, work: Path, stack: ExitStack, server: RlyServer) -> None:
        self.work, self.stack, self.server = work, stack, server
        self.status_files: list[Path] = []
        self.size = 0

    def grow(self, total: int) -> None:
        """Create devices up to `total` and start processes holding them."""
        entries = fleet_entries(self.server, self.size, total)
        for start in range(0, len(entries), PER_PROCESS):
            n = len(self.status_files)
            spread = str(min(2.0, len(entries) / 500))  # ramp up, as a fleet's boots would
            keys = self.work / f"sim-{n}.json"
            keys.write_text(json.dumps(entries[start : start + PER_PROCESS]))
            keys.chmod(0o600)
            status = self.work / f"sim-{n}.status"
            argv = [
                sys.executable,
                "-m",
                "bench.sim_device",
                "--port",
                str(self.server.device_port),
            ]
            argv += ["--keys", str(keys), "--status", str(status), "--spread", spread]
            argv += ["--ca", str(self.server.data_dir / "keys" / "host_ca.pub")]
            proc = ManagedProcess(argv, workdir=self.work, name=f"sim-{n}")
            self.stack.callback(proc.stop)
            proc.start()
            self.status_files.append(status)
        self.size = total

    def counts(self) -> dict[str, int]:
        total = {"up": 0, "connects": 0, "denied": 0}
        for path in self.status_files:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            for k in total:
                total[k] += int(data[k])
        return total

    def wait(self, *, connects: int, timeout: float) -> float:
        """Seconds until all devices are up with at least `connects` connects in total."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            c = self.counts()
            if c["denied"]:
                raise Unavailable(f"{c['denied']} device logins refused by the relay")
            if c["up"] >= self.size and c["connects"] >= connects:
                return time.monotonic() - start
            time.sleep(0.2)
        c = self.counts()
        raise Unavailable(f"only {c['up']} of {self.size} tunnels up after {timeout:g}s")


def fleet_entries(server: RlyServer, first: int, total: int) -> list[list[str]]:
    """Devices `first`..`total`-1 as [id, private key, source ip]; one loopback address each."""
    made = create_devices(server, [f"sim{i:07d}" for i in range(first, total)])
    return [
        [
            device_id,
            key.export_private_key().decode(),
            f"127.{1 + i // 65536}.{i // 256 % 256}.{i % 256}",
        ]
        for i, (device_id, key) in enumerate(made, start=first)
    ]


def rss_kib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        line = next(ln for ln in status if ln.startswith("VmRSS:"))
    return float(line.split()[1])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_percent(pid: int, window: float) -> float:
    """CPU use of `pid` over the next `window` seconds, in % of one core."""
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(window)
    return (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 100


def run(work: Path, scale: Scale, rly: bool) -> LegResult:
    """Grow the fleet level by level, measure at each, then kill and restart the relay."""
    result = LegResult("idle_tunnels", targets=targets(scale.idle_counts[-1]))
    if not rly:
        result.unavailable["rly"] = "--no-rly"
        return result
    try:
        with ExitStack() as stack:
            measure(work, stack, scale, result)
    except Unavailable as exc:
        result.unavailable["rly"] = str(exc)
    return result


def measure(work: Path, stack: ExitStack, scale: Scale, result: LegResult) -> None:
    server = start_server(work, stack)
    assert server.process is not None
    time.sleep(1)
    base_rss = rss_kib(server.process.pid)
    base_cpu = cpu_percent(server.process.pid, scale.idle_window)
    fleet = Fleet(work, stack, server)
    result.notes.append(
        f"relay with no tunnels: RSS {base_rss / KiB:.1f} MiB, CPU {base_cpu:.2f}% of a core "
        f"(subtracted); idle window {scale.idle_window:g} s; keepalive defaults "
        f"(30 s x 3: devices probe after {KEEPALIVE[0]:g} s of silence, the relay answers)"
    )
    for count in scale.idle_counts:
        fleet.grow(count)
        up = fleet.wait(connects=count, timeout=max(120.0, count / 20))
        time.sleep(1)
        rss = rss_kib(server.process.pid)
        total_cpu = cpu_percent(server.process.pid, scale.idle_window)
        figures = {
            "RSS per tunnel": ("KiB", (rss - base_rss) / count),
            "keepalive CPU": ("% core", total_cpu - base_cpu),
            "relay CPU": ("% core", total_cpu),
            "all up": ("s", up),
        }
        for name, (unit, value) in figures.items():
            metric = result.metric(f"{name} @{count}", "rly", unit, higher_is_better=False)
            metric.samples.append(value)
    top = scale.idle_counts[-1]
    connects_before = fleet.counts()["connects"]
    start = time.monotonic()
    server.kill()
    server.restart()
    try:
        fleet.wait(connects=connects_before + top, timeout=STORM_LIMIT)
    except Unavailable as exc:  # not all back: the target failed, it was not unmeasured
        result.failed[f"reconnect storm @{top}"] = f"{exc} after the restart"
        return
    storm = time.monotonic() - start
    result.metric(f"reconnect storm @{top}", "rly", "s", higher_is_better=False).samples.append(
        storm
    )
