"""Leg: 100,000 enrolled on-demand devices on PostgreSQL: the cost of keeping them checked in,
and the time to connect to one of them.

Set-up (not measured): one fresh PostgreSQL database, `rly serve --only
tracker` (the measured process) and `rly serve --only relay,portal`; 100,000
accepted on-demand device rows inserted in bulk (keys derived from a seed, see
bench.longpoll_worker), plus one real `rly-client` (builtin target, on-demand,
`idle_timeout` 3 s so each connect finds its tunnel closed) among them.

The check-ins are real: signed HTTP long polls to the real tracker. Two cores
cannot hold 100,000 long polls for 25 s each, so the tracker's
`checkin_wait` is lowered to WAIT seconds and the load generator holds
CONCURRENCY polls at once, cycling through ACTIVE of the devices: each
check-in still takes the whole long-poll path (signature, record, hub
subscription, wait, answer), at about CONCURRENCY / WAIT per second.

- measured, cold: the first check-in of each active device since the tracker
  started (no cached key: the full path), as after a tracker restart;
- measured, warm: steady state over the window, with the technician's
  connects in the middle of it;
- derived (100k): the warm cost per check-in times the rate 100,000 devices
  need at the defaults: rly-client long-polls `tracker.checkin_wait` (25 s,
  core/config.py) and polls again at once, so 4,000 check-ins/s.

Database cost is read as in bench.fleet_checkins (backend CPU from /proc,
rows from pg_stat_database after its counters have caught up).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, insert, select

from bench.checkins import postgres_url
from bench.common import LegResult, Scale, Target, Unavailable, percentile
from bench.connect_time import rly_connect
from bench.fleet_checkins import IDLE_WINDOW, PgCost, PgProbe, start_second, subdir
from bench.idle_tunnels import cpu_seconds
from bench.longpoll_worker import device_id, public_key_text
from bench.rly_stack import (
    ACCOUNT,
    Approver,
    approve_session,
    cli,
    rly_client_argv,
    sessions_for,
    start_server,
    technician,
)
from core.config import HttpSettings, TrackerSettings
from tests.support.procs import ManagedProcess
from tests.support.rly_server import RlyServer
from tests.support.technician import Technician

MEASURED = "measured"
DERIVED = "100k derived"
TARGETS = [Target("connect→prompt", MEASURED, "<", 1500.0)]
SEED = "rly-bench-on-demand"
WORKERS = 2
CLIENT_IDLE = 3.0  # the real rly-client's idle_timeout: its tunnel closes between connects


@dataclass(frozen=True)
class Size:
    fleet: int  # device rows
    active: int  # devices the load generator checks in
    concurrency: int  # long polls held at once
    wait: float  # tracker.checkin_wait and the devices' `wait`
    window: float  # seconds of warm load


FULL = Size(fleet=100_000, active=8_000, concurrency=800, wait=2.0, window=60.0)
SMOKE = Size(fleet=200, active=200, concurrency=40, wait=1.0, window=4.0)


@dataclass(frozen=True)
class Phase:
    ok: int
    wall: float
    tracker_cpu: float
    pg: PgCost


def run(work: Path, scale: Scale, rly: bool) -> LegResult:
    result = LegResult("on_demand_fleet", targets=TARGETS)
    if not rly:
        result.unavailable = {MEASURED: "--no-rly", DERIVED: "--no-rly"}
        return result
    size = SMOKE if scale.smoke else FULL
    try:
        with ExitStack() as stack:
            _measure(work, stack, size, scale.connects, result)
    except (Unavailable, AssertionError, OSError, subprocess.TimeoutExpired) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        result.unavailable.setdefault(MEASURED, reason)
    return result


def _measure(work: Path, stack: ExitStack, size: Size, connects: int, result: LegResult) -> None:
    url = postgres_url(stack)
    tracker_config = {"tracker": {"checkin_wait": f"{size.wait:g}s", "tunnel_mode": "on-demand"}}
    tracker = start_server(
        subdir(work / "tracker"), stack, tracker_config, only="tracker", database_url=url
    )
    relay = start_second(
        subdir(work / "relay"),
        stack,
        tracker,
        url,
        "relay,portal",
        relay={"node_name": "bench-relay"},
    )
    probe = PgProbe(url)
    stack.callback(probe.close)
    inserted = _insert_fleet(tracker, size.fleet)
    client_id = _start_client(work, stack, tracker)
    approver = Approver(relay)
    stack.callback(approver.close)
    menu = technician(relay)
    stack.callback(menu.close)
    approve_session(menu, approver)
    probe.measure_idle(5.0 if size is SMOKE else IDLE_WINDOW, settle=True)
    result.notes.append(
        f"set-up: {size.fleet} on-demand device rows inserted in {inserted:.1f} s, plus one "
        f"real rly-client ({client_id}, builtin target, idle_timeout {CLIENT_IDLE:g} s)"
    )
    assert tracker.process is not None
    pid = tracker.process.pid

    cold = _phase(work, tracker, pid, probe, size, passes=1)
    window: list[float] = []
    warm = _phase(
        work,
        tracker,
        pid,
        probe,
        size,
        duration=size.window,
        during=lambda: window.extend(_connects(menu, tracker, client_id, connects)),
    )
    _report(result, size, cold, warm, window)


def _insert_fleet(server: RlyServer, count: int) -> float:
    """`count` accepted on-demand devices straight into the database; seconds it took."""
    from core.accounts import get_account
    from core.models import Device, utcnow

    start = time.perf_counter()
    engine, sessions = sessions_for(server)
    try:
        with sessions() as session, session.begin():
            account_id = get_account(session, ACCOUNT).id
        now = utcnow()
        rows = []
        for i in range(count):
            key = public_key_text(SEED, i)
            blob = base64.b64decode(key.split()[1])
            fingerprint = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
            rows.append(
                {
                    "id": device_id(i),
                    "account_id": account_id,
                    "hostname": f"bench-{i}",
                    "serial": f"bench-{i}",
                    "public_key": key,
                    "key_fingerprint": f"SHA256:{fingerprint}",
                    "status": "accepted",
                    "tunnel_mode": "on-demand",
                    "created_at": now,
                    "accepted_at": now,
                }
            )
        with engine.begin() as conn:
            for chunk in range(0, len(rows), 5000):
                conn.execute(insert(Device), rows[chunk : chunk + 5000])
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE devices")
            stored = conn.scalar(select(func.count()).select_from(Device))
        if stored is None or stored < count:
            raise Unavailable(f"only {stored} device rows stored")
    finally:
        engine.dispose()
    return time.perf_counter() - start


def _start_client(work: Path, stack: ExitStack, tracker: RlyServer) -> str:
    """Enroll and run a real on-demand rly-client; return its id once it long-polls."""
    out = cli(tracker, "enroll-token", "create", "--account", ACCOUNT, "--auto-accept")
    token = re.search(r"token (\S+)", out)
    if token is None:
        raise Unavailable("enroll-token create printed no token")
    config = work / "on-demand-client.toml"
    argv = [*rly_client_argv(), "enroll", "--tracker", tracker.base_url, "--token", token.group(1)]
    argv += ["--config", str(config), "--target", "builtin", "--hostname", "bench-on-demand"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise Unavailable(f"rly-client enroll: {done.stderr.strip()[-200:]}")
    text = config.read_text()
    if "tunnel_mode" in text and "on-demand" not in text:
        raise Unavailable("rly-client was not enrolled on-demand")
    idle = f"idle_timeout = {CLIENT_IDLE}"
    text, replaced = re.subn(r"(?m)^idle_timeout\s*=.*$", idle, text)
    config.write_text(text if replaced else f"{idle}\n{text}")  # top-level: before any table
    found = re.search(r'device_id\s*=\s*"([^"]+)"', text)
    if found is None:
        raise Unavailable("rly-client config has no device_id")
    client = ManagedProcess(
        [*rly_client_argv(), "run", "--config", str(config)], workdir=work, name="client-on-demand"
    )
    stack.callback(client.stop)
    client.start()
    _wait(lambda: _checked_in(tracker, found.group(1)), 30, "the rly-client's first check-in")
    time.sleep(1.0)  # its next check-in is the long poll the connect will wake
    return found.group(1)


def _checked_in(server: RlyServer, device: str) -> bool:
    from core.models import Device

    engine, sessions = sessions_for(server)
    try:
        with sessions() as session:
            row = session.get(Device, device)
            return row is not None and row.last_checkin_at is not None
    finally:
        engine.dispose()


def _tunnel_closed(server: RlyServer, device: str) -> bool:
    from core.models import Tunnel

    engine, sessions = sessions_for(server)
    try:
        with sessions() as session:
            found = session.scalar(
                select(Tunnel.id).where(Tunnel.device_id == device, Tunnel.closed_at.is_(None))
            )
            return found is None
    finally:
        engine.dispose()


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise Unavailable(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


def _connects(menu: Technician, server: RlyServer, device: str, count: int) -> list[float]:
    """`connect DEVICE` → its prompt, `count` times, each with the tunnel closed first."""
    samples = []
    for _ in range(count):
        _wait(lambda: _tunnel_closed(server, device), 30, "the on-demand tunnel to idle out")
        samples.append(rly_connect(menu, device))
    return samples


def _phase(
    work: Path,
    tracker: RlyServer,
    pid: int,
    probe: PgProbe,
    size: Size,
    *,
    passes: int = 1,
    duration: float | None = None,
    during: Callable[[], None] | None = None,
) -> Phase:
    """Run the long-poll workers (`passes` over the active devices, or for `duration`)."""
    start_at = time.time() + 3.0  # the workers derive their keys first
    per_worker = size.active // WORKERS
    procs, outs = [], []
    for n in range(WORKERS):
        out = work / f"longpoll-{time.monotonic_ns()}-{n}.json"
        argv = [sys.executable, "-m", "bench.longpoll_worker", "--url", tracker.base_url]
        argv += ["--seed", SEED, "--first", str(n * per_worker), "--count", str(per_worker)]
        argv += ["--concurrency", str(size.concurrency // WORKERS), "--wait", f"{size.wait:g}"]
        argv += ["--start-at", str(start_at), "--out", str(out)]
        argv += ["--passes", str(passes)] if duration is None else ["--duration", f"{duration:g}"]
        procs.append(ManagedProcess(argv, workdir=work, name="longpoll-worker").start())
        outs.append(out)
    pg0 = probe.sample()
    cpu0 = cpu_seconds(pid)
    try:
        if during is not None:
            time.sleep(max(start_at - time.time(), 0) + size.wait)
            during()
        for proc in procs:
            if proc.wait(timeout=900) != 0:
                raise Unavailable(f"long-poll worker failed: {proc.stderr.strip()[-200:]}")
    finally:
        for proc in procs:
            proc.stop()
    cpu = cpu_seconds(pid) - cpu0
    results = [json.loads(out.read_text()) for out in outs]
    ok = sum(r["ok"] for r in results)
    errors = [r for r in results if r["errors"]]
    if errors:
        raise Unavailable(f"check-ins refused {errors[0]['errors']}: {errors[0]['first_error']}")
    pg1 = probe.settled(pg0, ok)
    return Phase(ok, max(r["elapsed"] for r in results), cpu, probe.cost(pg0, pg1))


def _report(result: LegResult, size: Size, cold: Phase, warm: Phase, connects: list[float]) -> None:
    defaults = TrackerSettings()
    cap = HttpSettings().max_connections
    full_rate = 100_000 / defaults.checkin_wait  # rly-client polls again at once
    interval_factor = defaults.checkin_wait / defaults.checkin_interval

    def add(name: str, path: str, unit: str, value: float, *, higher: bool = False) -> None:
        result.metric(name, path, unit, higher_is_better=higher).samples.append(value)

    per_warm = warm.tracker_cpu / warm.ok
    rows = warm.pg.rows_written / warm.ok
    backend = warm.pg.backend_cpu / warm.ok
    add("check-ins/s", MEASURED, "1/s", warm.ok / warm.wall, higher=True)
    add("tracker cores", MEASURED, "CPU-s/s", warm.tracker_cpu / warm.wall)
    add("tracker CPU/check-in", MEASURED, "us", per_warm * 1e6)
    add("tracker CPU/check-in cold", MEASURED, "us", cold.tracker_cpu / cold.ok * 1e6)
    add("PG rows written/check-in", MEASURED, "rows", rows)
    add("PG rows written/s", MEASURED, "1/s", warm.pg.rows_written / warm.wall)
    add("PG backend CPU/check-in", MEASURED, "us", backend * 1e6)
    add("PG backend cores", MEASURED, "CPU-s/s", warm.pg.backend_cpu / warm.wall)
    add("PG commits/check-in", MEASURED, "1", warm.pg.commits / warm.ok)
    for seconds in connects:
        add("connect→prompt", MEASURED, "ms", seconds * 1000)
    add("check-ins/s", DERIVED, "1/s", full_rate, higher=True)
    add("tracker cores", DERIVED, "CPU-s/s", full_rate * per_warm)
    add("tracker cores first cycle", DERIVED, "CPU-s/s", full_rate * cold.tracker_cpu / cold.ok)
    add("PG rows written/s", DERIVED, "1/s", full_rate * rows)
    add("PG backend cores", DERIVED, "CPU-s/s", full_rate * backend)
    result.notes += [
        f"measured: {size.fleet} device rows; {cold.ok} cold check-ins (first since tracker "
        f"start, {size.active} devices), then {warm.ok} warm over {warm.wall:.0f} s; "
        f"{size.concurrency} long polls held at once, tracker.checkin_wait = {size.wait:g} s "
        "(each check-in a whole long poll: record, hub wait, answer)",
        f"derived: 100,000 devices x one long poll per tracker.checkin_wait "
        f"({defaults.checkin_wait:g} s default) = {full_rate:,.0f} check-ins/s, times the warm "
        f"per-check-in cost; 'first cycle' uses the cold cost (every key uncached after a "
        f"tracker restart); devices that do not long-poll check in every checkin_interval "
        f"({defaults.checkin_interval:g} s): x{interval_factor:.2f}",
        f"each held long poll is one HTTP connection: a tracker process serves at most "
        f"http.max_connections ({cap:,} by default; 503 beyond) at once, so 100,000 devices "
        f"holding {defaults.checkin_wait:g} s polls need >= {-(-100_000 // cap)} tracker "
        f"processes (or a higher http.max_connections) for the connections alone",
    ]
    if connects:
        result.notes.append(
            f"connect: {len(connects)} menu `connect DEV` to the prompt of a real on-demand "
            f"rly-client among the rows, tunnel closed before each, under the warm load; "
            f"max {max(connects) * 1000:.0f} ms, p90 {percentile(connects, 90) * 1000:.0f} ms"
        )
