"""Leg: cross-node event delay A→B on one PostgreSQL, LISTEN/NOTIFY against polling.

Two fleets, one after the other, each on its own fresh database: `rly serve
--only tracker,portal` plus two relays (relay-a on 127.0.1.1, relay-b on
127.0.1.2) and one real rly-client tunnelled at relay-b. "notify" is the
default (`database_notify = true`: NOTIFY in the writer's transaction, one
LISTEN per process, a 2 s safety poll); "poll" sets it false everywhere, which
is the change feed as it was before (every process polls every 0.3 s).

- approval: the portal process's decision stamp (`decided_at`) → the menu
  prompt on relay-b's technician terminal (one clock: one machine).
- close: `close SESSION-ID` typed on relay-a (its audit row's stamp) →
  relay-b ends the session (`ended_at`).
- repair: `repair DEV` typed on relay-a → relay-b closes the tunnel row
  (database stamps of the request and the close, one clock).
- idle CPU of relay-a (no tunnels) over the idle window: the change feed's
  own cost, which was 1.2% of a core when it polled every 0.3 s.
"""

from __future__ import annotations

import contextlib
import re
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from sqlalchemy import select

from bench.common import LegResult, Scale, Target, Unavailable, percentile
from bench.idle_tunnels import cpu_percent
from core.approvals import token_hash
from core.models import Approval, AuditEvent, Device, SshSession, Tunnel
from tests.fleet.support import URL_RE, Fleet, PortalUser, wait_for
from tests.support.technician import Technician

TARGETS = [
    Target("approval p99", "notify", "<", 100.0),
    Target("close p99", "notify", "<", 100.0),
    Target("repair p99", "notify", "<", 100.0),
    Target("approval p99", "poll", "<", 1000.0),
]
MODES = ("notify", "poll")


def run(work: Path, scale: Scale, rly: bool) -> LegResult:
    result = LegResult("events", targets=TARGETS)
    if not rly:
        result.unavailable = {mode: "--no-rly" for mode in MODES}
        return result
    count = 3 if scale.smoke else 40
    for mode in MODES:
        try:
            samples, idle = _measure(work / mode, mode, count, scale.idle_window)
        except (Unavailable, AssertionError, OSError) as exc:
            result.unavailable[mode] = str(exc).splitlines()[0]
            continue
        for event, values in samples.items():
            for pct in (50, 99):
                metric = result.metric(f"{event} p{pct}", mode, "ms", higher_is_better=False)
                metric.samples.append(percentile(values, pct) * 1000)
                metric.raw = [v * 1000 for v in values]  # every sample, for the JSON
        result.metric("relay idle CPU", mode, "%", higher_is_better=False).samples.append(idle)
    result.notes.append(
        f"{count} samples per event and mode; idle CPU over {scale.idle_window:g} s of relay-a "
        "(no tunnels, one technician-free process)"
    )
    return result


def _measure(
    work: Path, mode: str, count: int, idle_window: float
) -> tuple[dict[str, list[float]], float]:
    work.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        url = _database(stack)
        notify = {"database_notify": mode == "notify"}
        fleet = Fleet(work, url, hub_config=notify)
        stack.callback(fleet.stop)
        fleet.relay_config = notify
        fleet.add_relay("relay-b", "127.0.1.2")
        device = fleet.enroll_device("bench-ev")  # relay-b is the only relay: its tunnel is there
        fleet.wait_online(device.id)
        fleet.add_relay("relay-a", "127.0.1.1")
        user = fleet.portal_user("bench")
        idle = cpu_percent(_pid(fleet, "relay-a"), idle_window)
        samples = {
            "approval": [_approval_delay(fleet, user) for _ in range(count)],
            **_close_and_repair(fleet, user, device.id, count),
        }
        return samples, idle


def _database(stack: contextlib.ExitStack) -> str:
    import psycopg

    from tests.support.pg import fresh_database

    try:
        return stack.enter_context(fresh_database())
    except psycopg.OperationalError as exc:
        raise Unavailable(f"PostgreSQL: {str(exc).strip().splitlines()[0]}") from None


def _pid(fleet: Fleet, relay: str) -> int:
    process = fleet.relays[relay].process
    assert process is not None
    return process.pid


def _approved(fleet: Fleet, relay: str, user: PortalUser) -> tuple[Technician, float]:
    """(technician at the menu, seconds from the portal's decision stamp to the prompt)."""
    tech = fleet.technician(fleet.relays[relay])
    token = tech.expect(URL_RE).group(2)
    user.decide(token)
    tech.expect(re.escape(f"rly:{user.username}@acme> "))
    seen = datetime.now(UTC)
    with fleet.db() as s:
        decided = s.scalar(
            select(Approval.decided_at).where(Approval.token_hash == token_hash(token))
        )
    assert decided is not None
    return tech, (seen - decided).total_seconds()


def _approval_delay(fleet: Fleet, user: PortalUser) -> float:
    tech, delay = _approved(fleet, "relay-b", user)
    tech.close()
    return delay


def _close_and_repair(
    fleet: Fleet, user: PortalUser, device_id: str, count: int
) -> dict[str, list[float]]:
    worker, _ = _approved(fleet, "relay-b", user)
    boss, _ = _approved(fleet, "relay-a", user)
    closes, repairs = [], []
    try:
        for _ in range(count):
            worker.sendline(f"connect {device_id}")
            worker.expect(r"[#$] ", timeout=20)
            session_id = wait_for(lambda: _open_session(fleet, device_id), 10, "session row")
            boss.sendline(f"close {session_id}")
            worker.expect("closed: closed by")
            boss.expect("to close")
            closes.append(wait_for(partial(_close_delay, fleet, session_id), 10, "session end"))
        bosses = {"relay-a": boss, "relay-b": worker}
        for _ in range(count):
            tunnel = fleet.wait_online(device_id)
            other = "relay-a" if tunnel.relay_node == "relay-b" else "relay-b"  # repair from afar
            bosses[other].sendline(f"repair {device_id}")
            repairs.append(_drop_delay(fleet, device_id, tunnel.id))
            bosses[other].expect(r"Repair(ed| failed)", timeout=40)
    finally:
        worker.close()
        boss.close()
    return {"close": closes, "repair": repairs}


def _open_session(fleet: Fleet, device_id: str) -> str | None:
    with fleet.db() as s:
        return s.scalar(
            select(SshSession.id).where(
                SshSession.device_id == device_id, SshSession.ended_at.is_(None)
            )
        )


def _close_delay(fleet: Fleet, session_id: str) -> float | None:
    """Seconds from the close request's audit row (relay-a) to the session's end (relay-b)."""
    with fleet.db() as s:
        ended = s.scalar(select(SshSession.ended_at).where(SshSession.id == session_id))
        asked = s.scalar(
            select(AuditEvent.at).where(
                AuditEvent.action == "session.close_requested",
                AuditEvent.detail.startswith(f"session={session_id}"),
            )
        )
    if ended is None or asked is None:
        return None
    return max((ended - asked).total_seconds(), 1e-6)


def _drop_delay(fleet: Fleet, device_id: str, tunnel_id: int) -> float:
    """Seconds from the tunnel request to the close of the tunnel row (database stamps)."""

    def closed() -> float | None:
        with fleet.db() as s:
            closed_at = s.scalar(select(Tunnel.closed_at).where(Tunnel.id == tunnel_id))
            asked = s.scalar(select(Device.tunnel_request_at).where(Device.id == device_id))
        if closed_at is None or asked is None:
            return None
        return max((closed_at - asked).total_seconds(), 1e-6)

    return wait_for(closed, 10, f"tunnel {tunnel_id} closed")
