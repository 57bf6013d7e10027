"""`rly serve` killed with SIGKILL mid-session, then restarted: clients, devices and rows.

The 50 devices are rly-client's own tunnel supervisor (`device_client.runner.Runner.supervise`,
with its `device_client.tunnel.Backoff`) run 50 times in ONE helper process: this
file run as `python -m tests.adversarial.test_faults_sigkill SPEC.json`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import asyncssh
import pytest
from sqlalchemy import select

from core.models import AuditEvent, SshSession, Tunnel
from tests.relay.device_port_support import host_ca_public, new_key, wait_until, write_key
from tests.relay.test_technician_support import TechDb, approve, device_tunnel
from tests.support.procs import ProcessFactory
from tests.support.rly_server import REPO_ROOT, RlyServer
from tests.support.sshd import SshdFactory
from tests.support.technician import Technician

FLEET = 50
BACKOFF_CAP = 20.0  # RLY_CLIENT_BACKOFF_CAP for the fleet: the longest a device may wait
MAX_SHARE_PER_SECOND = 0.20


@dataclass
class Row:
    id: int
    device_id: str
    connected_at: datetime
    closed_at: datetime | None
    close_reason: str | None


def _tunnels(db: TechDb) -> list[Row]:
    return db.run(
        lambda s: [
            Row(t.id, t.device_id, t.connected_at, t.closed_at, t.close_reason)
            for t in s.scalars(select(Tunnel).order_by(Tunnel.id))
        ]
    )


def _audit(db: TechDb) -> list[tuple[int, str, str, str, str]]:
    return db.run(
        lambda s: [
            (e.id, e.at.isoformat(), e.action, e.target, e.detail)
            for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))
        ]
    )


def _busiest_second(times: list[float]) -> int:
    """The largest number of events inside any 1-second window."""
    times = sorted(times)
    best = start = 0
    for end, t in enumerate(times):
        while t - times[start] > 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


@dataclass
class Aftermath:
    """What one SIGKILL + restart of `rly serve` left behind, for the tests below to judge."""

    tech_status: int | None
    tech_exit_after: float  # seconds from SIGKILL to the technician's ssh exiting
    fleet: list[str]
    outage: float  # seconds from SIGKILL to the restarted relay's `rly: ready`
    back_after: float  # seconds from `rly: ready` until every fleet device had a new tunnel
    arrivals: list[float]  # epoch seconds of each fleet device's first new tunnel row
    stale: list[Row]  # tunnel rows written before the kill, as they are after the restart
    session_end: tuple[datetime | None, str | None]
    audit_before: list[tuple[int, str, str, str, str]]
    audit_after: list[tuple[int, str, str, str, str]]


def _start_fleet(
    db: TechDb, relay: RlyServer, processes: ProcessFactory, workdir: Path
) -> list[str]:
    """FLEET device rows, and one helper process holding all their tunnels."""
    keys = [new_key() for _ in range(FLEET)]
    account = db.add_account("fleet")
    fleet = [(db.add_device(account, key), key) for key in keys]
    spec = {
        "relay_port": relay.device_port,
        "host_ca": host_ca_public(relay.data_dir),
        "user_ca": (relay.data_dir / "keys" / "user_ca.pub").read_text().strip(),
        "backoff_cap": BACKOFF_CAP,
        "dir": str(workdir / "fleet"),
        "devices": [
            {"id": device_id, "key": str(write_key(key, workdir / f"fleet_key_{device_id}"))}
            for device_id, key in fleet
        ],
    }
    spec_path = workdir / "fleet.json"
    spec_path.write_text(json.dumps(spec))
    processes(
        [sys.executable, "-m", "tests.adversarial.test_faults_sigkill", str(spec_path)],
        name="fleet",
        cwd=REPO_ROOT,
    )
    return [device_id for device_id, _ in fleet]


def _scenario(db: TechDb, relay: RlyServer, processes: ProcessFactory, sshds: SshdFactory,
              workdir: Path) -> Aftermath:  # fmt: skip
    account = db.add_account("acme")
    db.add_user("alice", "acme")
    user_ca = (relay.data_dir / "keys" / "user_ca.pub").read_text()
    sshd = sshds(trusted_user_ca_keys=[user_ca])
    box_key = new_key()
    box = db.add_named_device(account, hostname="box-1", key=box_key)
    device_tunnel(processes, relay, box, box_key, sshd.port)
    fleet = _start_fleet(db, relay, processes, workdir)
    wanted = {*fleet, box}
    wait_until(
        lambda: wanted <= {r.device_id for r in _tunnels(db) if r.closed_at is None}, timeout=30
    )

    with Technician(relay.technician_port) as tech:
        approve(tech, db, "alice")
        tech.sendline("connect box-1")
        tech.sendline("echo in-$((6*7))-shell")
        tech.expect("in-42-shell")
        session = wait_until(lambda: db.sessions_of(box))[0]
        before_rows = _tunnels(db)
        audit_before = _audit(db)
        relay.kill()
        killed = time.monotonic()
        tech_status = tech.expect_eof(timeout=5)
        tech_exit_after = time.monotonic() - killed

    relay.restart()
    ready = time.monotonic()
    outage = ready - killed
    last_before = before_rows[-1].id

    def returned() -> list[Row] | None:
        rows = [r for r in _tunnels(db) if r.id > last_before and r.closed_at is None]
        return rows if set(fleet) <= {r.device_id for r in rows} else None

    rows = wait_until(returned, timeout=BACKOFF_CAP + 5, step=0.2)
    back_after = time.monotonic() - ready
    first = {r.device_id: r.connected_at.timestamp() for r in reversed(rows)}
    ended = db.run(lambda s: s.get_one(SshSession, session.id))
    return Aftermath(
        tech_status=tech_status,
        tech_exit_after=tech_exit_after,
        fleet=fleet,
        outage=outage,
        back_after=back_after,
        arrivals=[first[d] for d in fleet],
        stale=[r for r in _tunnels(db) if r.id <= last_before],
        session_end=(ended.ended_at, ended.end_reason),
        audit_before=audit_before,
        audit_after=_audit(db),
    )


@pytest.fixture(scope="module")
def aftermath(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Aftermath]:
    """Relay + 50 devices + a technician in a device shell; SIGKILL; restart; wait for the fleet."""
    workdir = tmp_path_factory.mktemp("sigkill")
    relay = RlyServer(
        workdir, config={"relay": {"approval_ttl": "60s"}, "tracker": {"checkin_wait": "2s"}}
    )
    processes = ProcessFactory(workdir)
    sshds = SshdFactory(workdir)
    db: TechDb | None = None
    try:
        relay.start()
        db = TechDb(relay.data_dir)
        yield _scenario(db, relay, processes, sshds, workdir)
    finally:
        processes.stop_all()
        sshds.stop_all()
        if db is not None:
            db.close()
        relay.stop()


def test_technician_ssh_exits_nonzero_within_5_s(aftermath: Aftermath) -> None:
    """SIGKILL of the relay mid-session: the technician's OpenSSH client exits non-zero < 5 s."""
    assert aftermath.tech_status not in (0, None), aftermath.tech_status
    assert aftermath.tech_exit_after < 5, aftermath.tech_exit_after


def test_devices_return_within_the_backoff_cap(aftermath: Aftermath) -> None:
    """After the restart all 50 devices have a tunnel again within the backoff cap + 5 s."""
    assert aftermath.back_after <= BACKOFF_CAP + 5, aftermath.back_after
    assert len(aftermath.arrivals) == FLEET


def test_stale_rows_are_closed_with_a_reason(aftermath: Aftermath) -> None:
    """Tunnel and session rows the killed process left open are closed as "relay restarted"."""
    assert len(aftermath.stale) >= FLEET + 1
    assert {r.close_reason for r in aftermath.stale} == {"relay restarted"}, aftermath.stale
    assert all(r.closed_at is not None for r in aftermath.stale)
    ended_at, reason = aftermath.session_end
    assert ended_at is not None and reason == "relay restarted", aftermath.session_end


def test_no_audit_row_written_before_the_kill_is_lost(aftermath: Aftermath) -> None:
    """Every audit row committed before SIGKILL is still there, unchanged, after the restart."""
    after = {row[0]: row for row in aftermath.audit_after}
    assert len(aftermath.audit_before) > FLEET  # tunnel.up rows at least
    assert [after.get(row[0]) for row in aftermath.audit_before] == aftermath.audit_before


def test_returning_devices_do_not_arrive_as_a_herd(aftermath: Aftermath) -> None:
    """Reconnect jitter: no more than 20 % of the fleet reconnects within any one second."""
    arrivals = aftermath.arrivals
    busiest = _busiest_second(arrivals)
    per_second = [0] * (int(max(arrivals) - min(arrivals)) + 1)
    for t in arrivals:
        per_second[int(t - min(arrivals))] += 1
    assert busiest <= FLEET * MAX_SHARE_PER_SECOND, (
        f"{busiest} of {FLEET} devices reconnected within one second; "
        f"returns per second after the first: {per_second} "
        f"(relay down for {aftermath.outage:.1f} s)"
    )


# -- the fleet helper process ------------------------------------------------------


async def _fleet(spec: dict[str, Any]) -> None:
    from device_client.api import TrackerClient
    from device_client.config import ClientConfig
    from device_client.runner import Runner
    from device_client.state import StateFile

    base = Path(spec["dir"])
    runners = []
    for device in spec["devices"]:
        config = ClientConfig(
            tracker_url="http://127.0.0.1:9",
            device_id=device["id"],
            key_file=Path(device["key"]),
            relay_hosts=("127.0.0.1",),
            relay_ports=(int(spec["relay_port"]),),
            relay_host_ca=spec["host_ca"],
            user_ca=spec["user_ca"],
            state_file=base / f"{device['id']}.json",
            target_port=9,
        )
        runner = Runner(
            config=config,
            key=asyncssh.read_private_key(device["key"]),
            tracker=cast(TrackerClient, None),  # supervise() never checks in
            state=StateFile(config.state_file, base / "client.toml"),
            backoff_cap=float(spec["backoff_cap"]),
        )
        runners.append(runner.supervise())
    await asyncio.gather(*runners)


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(_fleet(json.loads(Path(sys.argv[1]).read_text())))
