"""Leg: check-ins per tracker CPU-second on PostgreSQL with 1 and 2 tracker processes,
and what each check-in costs the database.

Two `rly serve --only tracker` processes share one fresh PostgreSQL database.
`bench.checkin_worker` processes send signed check-ins (`wait: 0`, the
cached-key fast path after a warm-up); in the "1-tracker" runs every worker
talks to tracker 1, in the "2-trackers" runs the workers are spread over both
(same workers, same total concurrency). The two alternate run by run.

- per tracker CPU-s: check-ins ÷ utime+stime of every tracker process driven
  (/proc), so the figure holds on a 2-core machine where two trackers, the
  load generators and PostgreSQL cannot all have a core of their own; the
  wall-clock rate is shown too, and its 2:1 ratio is bounded by this machine.
- the database's own cost: utime+stime of the bench database's backends
  (pids from pg_stat_activity; we run as root beside the server, so /proc
  shows them), and rows written (tup_inserted + tup_updated + tup_deleted of
  pg_stat_database), rows fetched and commits per check-in. PostgreSQL flushes
  an idle backend's counters up to 10 s late, so each run waits until they
  have caught up (at most 3 runs per path for that reason).

Nothing is pinned: the trackers, the load generators and PostgreSQL share
both cores as a real 2-core box would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bench.checkins import postgres_url
from bench.common import LegResult, Scale, Unavailable, interleaved
from bench.cpu import TICK
from bench.idle_tunnels import cpu_seconds
from bench.rly_stack import create_devices, start_server
from tests.support.procs import ManagedProcess
from tests.support.rly_server import RlyServer

DEVICES = 128
WORKERS = 2
CONCURRENCY = 16
MAX_RUNS = 3
PATHS = ("1-tracker", "2-trackers")
RATIO = "2-trackers/1-tracker"
SHARED_KEYS = ("host_ca", "host_ca.pub", "user_ca", "user_ca.pub")
IDLE_WINDOW = 10.0  # seconds of idle background measured before the runs
SETTLE_TIMEOUT = 12.0  # PostgreSQL's idle-backend statistics flush (10 s) plus margin


@dataclass(frozen=True)
class PgSample:
    """One reading of the bench database's cost counters."""

    at: float  # time.monotonic()
    backends: dict[int, float]  # the bench database's backends: pid -> CPU seconds so far
    server: dict[int, float]  # every postgres process (other users' work included)
    rows_written: int  # tup_inserted + tup_updated + tup_deleted
    rows_fetched: int
    commits: int


@dataclass(frozen=True)
class PgCost:
    """What happened between two samples, net of the idle background (see PgProbe.measure_idle)."""

    backend_cpu: float = 0.0
    server_cpu: float = 0.0
    rows_written: float = 0.0
    rows_fetched: float = 0.0
    commits: float = 0.0


class PgProbe:
    """Reads the bench database's backend CPU (/proc) and row counters (pg_stat_database)."""

    def __init__(self, sqlalchemy_url: str) -> None:
        url = sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)
        self.conn = psycopg.connect(url, autocommit=True, connect_timeout=5)
        row = self.conn.execute("SELECT pg_backend_pid(), current_database()").fetchone()
        assert row is not None
        self.own_pid, self.database = int(row[0]), str(row[1])
        self.postmaster = _stat(self.own_pid)[0]
        self.idle = PgCost()  # per second

    def sample(self) -> PgSample:
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        pids = [
            int(r[0])
            for r in self.conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.database,),
            )
        ]
        stats = self.conn.execute(
            "SELECT tup_inserted + tup_updated + tup_deleted, tup_fetched, xact_commit"
            " FROM pg_stat_database WHERE datname = %s",
            (self.database,),
        ).fetchone()
        assert stats is not None
        server: dict[int, float] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != self.own_pid:
                parent, cpu = _stat(int(entry))
                if parent == self.postmaster:
                    server[int(entry)] = cpu
        backends = {pid: server[pid] for pid in pids if pid in server}
        return PgSample(
            time.monotonic(), backends, server, int(stats[0]), int(stats[1]), int(stats[2])
        )

    def measure_idle(self, seconds: float, *, settle: bool = False) -> None:
        """The background rate to net out (safety polls, heartbeats ...).

        With `settle`, first wait out the flush delay of counters from earlier
        bursts (set-up writes), which would otherwise land in the window.
        """
        if settle:
            time.sleep(SETTLE_TIMEOUT - 1)
        before = self.sample()
        time.sleep(seconds)
        after = self.sample()
        self.idle = PgProbe._raw(before, after, per_second=True)

    def settled(self, before: PgSample, rows_at_least: int) -> PgSample:
        """A sample taken once the counters show `rows_at_least` written since `before`.

        Busy backends flush their counters every second, idle ones 10 s after
        their last transaction; a little margin lets the other backends' last
        flush land too.
        """
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            if self.sample().rows_written - before.rows_written >= rows_at_least:
                time.sleep(1.5)
                break
            time.sleep(0.25)
        return self.sample()

    def cost(self, before: PgSample, after: PgSample) -> PgCost:
        """The deltas minus the idle rate over the same time (never below zero)."""
        raw, span = PgProbe._raw(before, after), after.at - before.at
        return PgCost(
            *(
                max(getattr(raw, f.name) - getattr(self.idle, f.name) * span, 0.0)
                for f in dataclasses.fields(PgCost)
            )
        )

    @staticmethod
    def _raw(before: PgSample, after: PgSample, *, per_second: bool = False) -> PgCost:
        """Deltas; a process that started in between counts from zero (one that ended is lost)."""

        def cpu(a: dict[int, float], b: dict[int, float]) -> float:
            return sum(value - a.get(pid, 0.0) for pid, value in b.items())

        scale = 1 / (after.at - before.at) if per_second else 1.0
        return PgCost(
            backend_cpu=cpu(before.backends, after.backends) * scale,
            server_cpu=cpu(before.server, after.server) * scale,
            rows_written=(after.rows_written - before.rows_written) * scale,
            rows_fetched=(after.rows_fetched - before.rows_fetched) * scale,
            commits=(after.commits - before.commits) * scale,
        )

    def close(self) -> None:
        self.conn.close()


def _stat(pid: int) -> tuple[int | None, float]:
    """(parent pid, utime+stime seconds) of `pid`; (None, 0) if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None, 0.0
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def subdir(path: Path) -> Path:
    """A private working directory for one server."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def share_keys(source: RlyServer, target: RlyServer) -> None:
    """Give `target` the fleet's CA keys (what a second node of one fleet has)."""
    keys = target.data_dir / "keys"
    keys.mkdir(mode=0o700, exist_ok=True)
    for name in SHARED_KEYS:
        if (source.data_dir / "keys" / name).exists():
            shutil.copy2(source.data_dir / "keys" / name, keys / name)


def start_second(
    work: Path, stack: ExitStack, first: RlyServer, url: str, only: str, **config: object
) -> RlyServer:
    """Another `rly serve --only ONLY` on the first one's database and CA keys."""
    server = RlyServer(work, database_url=url, only=only, config=config)
    stack.callback(server.stop)
    share_keys(first, server)
    try:
        return server.start()
    except (AssertionError, TimeoutError, OSError) as exc:
        raise Unavailable(f"rly serve --only {only}: {str(exc).splitlines()[0]}") from None


def run(work: Path, scale: Scale, rly: bool) -> LegResult:
    result = LegResult("fleet_checkins")
    if not rly:
        result.unavailable = {p: "--no-rly" for p in PATHS}
        return result
    runs = scale.runs if scale.smoke else min(scale.runs, MAX_RUNS)
    count = max(scale.checkins // 2, 100)
    with ExitStack() as stack:
        try:
            url = postgres_url(stack)
            first = start_server(subdir(work / "t1"), stack, only="tracker", database_url=url)
            second = start_second(subdir(work / "t2"), stack, first, url, "tracker")
            probe = PgProbe(url)
            stack.callback(probe.close)
            keys = _device_keys(work, first)
        except Unavailable as exc:
            result.unavailable = {p: str(exc) for p in PATHS}
            return result
        trackers = {"1-tracker": [first], "2-trackers": [first, second]}
        # warm-up (imports, key caches, pools), let the counters settle, measure the background
        before = probe.sample()
        warm_up = 50 if scale.smoke else 400
        done = sum(drive(work, s, keys, warm_up, probe, settle=False)[0] for s in trackers.values())
        probe.settled(before, done)
        probe.measure_idle(5.0 if scale.smoke else IDLE_WINDOW)
        by_run: dict[int, dict[str, tuple[float, float]]] = {}
        for run_no, name in interleaved(runs, list(PATHS)):
            if name in result.unavailable:
                continue
            try:
                ok, wall, tracker_cpu, pg = drive(work, trackers[name], keys, count, probe)
            except Unavailable as exc:
                result.unavailable[name] = str(exc)
                continue
            _record(result, name, ok, wall, tracker_cpu, pg)
            by_run.setdefault(run_no, {})[name] = (ok / wall, ok / tracker_cpu)
        for pair in by_run.values():
            if len(pair) == 2:
                (rate1, cpu1), (rate2, cpu2) = pair["1-tracker"], pair["2-trackers"]
                unit = "x"
                result.metric("check-ins/s", RATIO, unit, higher_is_better=True).samples.append(
                    rate2 / rate1
                )
                result.metric(
                    "per tracker CPU-s", RATIO, unit, higher_is_better=True
                ).samples.append(cpu2 / cpu1)
    result.notes += [
        f"{count} signed check-ins per run (wait 0, cached-key fast path), {WORKERS} worker "
        f"processes x {CONCURRENCY} connections, {DEVICES} devices, {runs} runs per path",
        "per tracker CPU-s sums every tracker driven; PG backend CPU = the bench database's "
        "backends (pg_stat_activity pids, /proc); PG server CPU = every postgres process, "
        "other users of a shared server included (an upper bound)",
        f"{RATIO}: within one run; the wall-clock ratio is bounded by 2 cores shared by "
        "trackers, load generators and PostgreSQL, the per CPU-s ratio is what transfers",
    ]
    return result


def _device_keys(work: Path, server: RlyServer) -> list[Path]:
    """Accepted devices, one key file per worker (a device is only ever signed by one)."""
    made = create_devices(server, [f"fc{i:08d}" for i in range(DEVICES)])
    paths = []
    for n in range(WORKERS):
        path = work / f"fleet-keys-{n}.json"
        path.write_text(
            json.dumps([[d, k.export_private_key().decode()] for d, k in made[n::WORKERS]])
        )
        path.chmod(0o600)
        paths.append(path)
    return paths


def _record(
    result: LegResult, name: str, ok: int, wall: float, tracker_cpu: float, pg: PgCost
) -> None:
    def add(metric: str, unit: str, value: float, *, higher: bool) -> None:
        result.metric(metric, name, unit, higher_is_better=higher).samples.append(value)

    add("check-ins/s", "1/s", ok / wall, higher=True)
    add("per tracker CPU-s", "1/s", ok / tracker_cpu, higher=True)
    add("per CPU-s tracker+PG", "1/s", ok / (tracker_cpu + pg.backend_cpu), higher=True)
    add("PG backend CPU/check-in", "us", pg.backend_cpu / ok * 1e6, higher=False)
    add("PG server CPU/check-in", "us", pg.server_cpu / ok * 1e6, higher=False)
    add("PG rows written/check-in", "rows", pg.rows_written / ok, higher=False)
    add("PG rows fetched/check-in", "rows", pg.rows_fetched / ok, higher=False)
    add("PG commits/check-in", "1", pg.commits / ok, higher=False)


def drive(
    work: Path,
    servers: list[RlyServer],
    keys: list[Path],
    count: int,
    probe: PgProbe,
    *,
    settle: bool = True,
) -> tuple[int, float, float, PgCost]:
    """(check-ins, wall seconds, tracker CPU seconds, database cost) for `count` check-ins."""
    pids = [s.process.pid for s in servers if s.process is not None]
    start_at = time.time() + 1.5
    procs, outs = [], []
    for n, worker_keys in enumerate(keys):
        out = work / f"fleet-checkin-{time.monotonic_ns()}-{n}.json"
        argv = [sys.executable, "-m", "bench.checkin_worker"]
        argv += ["--url", servers[n % len(servers)].base_url, "--keys", str(worker_keys)]
        argv += ["--count", str(count // len(keys)), "--concurrency", str(CONCURRENCY)]
        argv += ["--start-at", str(start_at), "--out", str(out)]
        procs.append(ManagedProcess(argv, workdir=work, name="fleet-checkin-worker").start())
        outs.append(out)
    pg0 = probe.sample()
    cpu0 = sum(cpu_seconds(p) for p in pids)
    try:
        for proc in procs:
            if proc.wait(timeout=600) != 0:
                raise Unavailable(f"checkin worker failed: {proc.stderr.strip()[-200:]}")
    finally:
        for proc in procs:
            proc.stop()
    cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    results = [json.loads(out.read_text()) for out in outs]
    for out in outs:
        out.unlink(missing_ok=True)
    ok = sum(r["ok"] for r in results)
    errors = [r for r in results if r["errors"]]
    if errors:
        raise Unavailable(f"check-ins refused {errors[0]['errors']}: {errors[0]['first_error']}")
    pg1 = probe.settled(pg0, ok) if settle else probe.sample()
    return ok, max(r["elapsed"] for r in results), cpu, probe.cost(pg0, pg1)
