"""Leg 6: signed tracker check-ins per second per core, on SQLite and on PostgreSQL.

A real `rly serve --only tracker` per database, pinned to one CPU, driven by
`bench.checkin_worker` processes pinned to the other CPUs. Load generators
share the machine, so the figure that answers "per core" is check-ins per
CPU-second of the tracker process (/proc/<pid>/stat); the wall-clock rate is
kept too. The two databases alternate run by run.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from bench.common import LegResult, Scale, Target, Unavailable, interleaved
from bench.idle_tunnels import cpu_seconds
from bench.rly_stack import create_devices, start_server
from tests.support.procs import ManagedProcess
from tests.support.rly_server import RlyServer

DEVICES = 64
WORKERS = 2
CONCURRENCY = 16
TARGETS = [Target("per tracker CPU-s", "sqlite", ">=", 2000.0)]


def run(work: Path, scale: Scale, rly: bool) -> LegResult:
    """Start one tracker per database and alternate runs between them."""
    result = LegResult("checkins", targets=TARGETS)
    if not rly:
        result.unavailable["sqlite"] = result.unavailable["postgresql"] = "--no-rly"
        return result
    with ExitStack() as stack:
        trackers = start_trackers(work, stack, result, warm=0 if scale.smoke else 200)
        result.notes.append(
            f"{scale.checkins} check-ins per run, {WORKERS}x{CONCURRENCY} concurrent, "
            f"{DEVICES} devices, tracker pinned to CPU {sorted(tracker_cpus())}; the per CPU-s "
            "figure extrapolates when the tracker was not saturated (busy = rate / per-CPU-s)"
        )
        for _, name in interleaved(scale.runs, list(trackers)):
            if name in result.unavailable:
                continue
            server, keys = trackers[name]
            try:
                wall, per_cpu = drive(work, server, keys, scale.checkins)
            except Unavailable as exc:
                result.unavailable[name] = str(exc)
                continue
            result.metric("check-ins/s", name, "1/s", higher_is_better=True).samples.append(wall)
            result.metric("per tracker CPU-s", name, "1/s", higher_is_better=True).samples.append(
                per_cpu
            )
    return result


def start_trackers(
    work: Path, stack: ExitStack, result: LegResult, *, warm: int
) -> dict[str, tuple[RlyServer, list[Path]]]:
    """SQLite and PostgreSQL trackers with their devices; a failing one is marked unavailable.

    Each worker gets its own devices: two processes signing for one device
    would race on its timestamps and be refused as replays.
    """
    trackers: dict[str, tuple[RlyServer, list[Path]]] = {}
    for name in ("sqlite", "postgresql"):
        try:
            url = None
            if name == "postgresql":
                url = postgres_url(stack)
            server = start_server(work, stack, only="tracker", database_url=url)
            assert server.process is not None
            pin(server.process.pid, tracker_cpus())
            made = create_devices(server, [f"ck{i:08d}" for i in range(DEVICES)])
            keys = [work / f"checkin-keys-{name}-{n}.json" for n in range(WORKERS)]
            for n, path in enumerate(keys):
                mine = made[n::WORKERS]
                path.write_text(json.dumps([[d, k.export_private_key().decode()] for d, k in mine]))
                path.chmod(0o600)
            trackers[name] = (server, keys)
            if warm:
                drive(work, server, keys, warm)  # warm-up: imports, caches, connection pools
        except Unavailable as exc:
            result.unavailable[name] = str(exc)
    return trackers


def postgres_url(stack: ExitStack) -> str:
    """A fresh PostgreSQL database on 127.0.0.1:5432, dropped when the stack closes."""
    import psycopg

    from tests.support.pg import fresh_database

    try:
        return stack.enter_context(fresh_database())
    except psycopg.OperationalError as exc:
        raise Unavailable(f"PostgreSQL: {str(exc).strip().splitlines()[0]}") from None


def tracker_cpus() -> set[int]:
    cpus = sorted(os.sched_getaffinity(0))
    return {cpus[0]}


def worker_cpus() -> set[int]:
    cpus = sorted(os.sched_getaffinity(0))
    return set(cpus[1:]) or set(cpus)


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of `pid` (threads started later inherit it from their creator)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread may end meanwhile
            os.sched_setaffinity(int(tid), cpus)


def drive(work: Path, server: RlyServer, keys: list[Path], count: int) -> tuple[float, float]:
    """(check-ins per wall second, check-ins per tracker CPU second) for `count` check-ins."""
    assert server.process is not None
    start_at = time.time() + 1.5
    procs, outs = [], []
    for n, worker_keys in enumerate(keys):
        out = work / f"checkin-{time.monotonic_ns()}-{n}.json"
        argv = [sys.executable, "-m", "bench.checkin_worker", "--url", server.base_url]
        argv += ["--keys", str(worker_keys), "--count", str(count // len(keys))]
        argv += ["--concurrency", str(CONCURRENCY), "--start-at", str(start_at), "--out", str(out)]
        proc = ManagedProcess(argv, workdir=work, name="checkin-worker").start()
        pin(proc.pid, worker_cpus())
        procs.append(proc)
        outs.append(out)
    cpu0 = cpu_seconds(server.process.pid)
    try:
        for proc in procs:
            if proc.wait(timeout=600) != 0:
                raise Unavailable(f"checkin worker failed: {proc.stderr.strip()[-200:]}")
    finally:
        for proc in procs:
            proc.stop()
    cpu = cpu_seconds(server.process.pid) - cpu0
    results = [json.loads(out.read_text()) for out in outs]
    ok = sum(r["ok"] for r in results)
    errors = [r for r in results if r["errors"]]
    if errors:
        raise Unavailable(f"check-ins refused {errors[0]['errors']}: {errors[0]['first_error']}")
    return ok / max(r["elapsed"] for r in results), ok / cpu
