"""Cross-node events on one PostgreSQL: approval, close, repair and revoke within a second.

Every process LISTENs on `rly_events`; writers NOTIFY in the same transaction,
so a change made through one process reaches another in milliseconds. The
safety-net poll runs every 2 s, so the 0.5 s bounds below fail without NOTIFY
(bar a lucky draw on all four), while the contract itself is 1 s. A relay
with `database_notify = false` still sees changes by polling every 0.3 s.
"""

from __future__ import annotations

import re
import time

import pytest
from sqlalchemy import select, text

from core.models import Device, SshSession, Tunnel
from tests.fleet.support import URL_RE, Fleet, PortalUser, wait_for
from tests.support.technician import Technician

NOTIFY_BOUND = 0.5
CONTRACT = 1.0


def listeners(fleet: Fleet) -> set[str]:
    """application_name of every LISTEN connection on this database."""
    with fleet.db() as s:
        rows = s.execute(
            text(
                "SELECT application_name FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE 'rly events %'"
            )
        )
        return {str(r[0]) for r in rows}


def approved_technician(fleet: Fleet, relay: str, user: PortalUser) -> tuple[Technician, float]:
    """ssh partner@relay, approve through the tracker+portal process; return (tech, delay)."""
    tech = fleet.technician(fleet.relays[relay])
    token = tech.expect(URL_RE).group(2)
    decided = user.decide(token)
    tech.expect(re.escape(f"rly:{user.username}@acme> "))
    return tech, time.monotonic() - decided


@pytest.fixture(scope="module")
def alice(fleet: Fleet) -> PortalUser:
    return fleet.portal_user("alice")


def test_every_process_listens(fleet: Fleet) -> None:
    """The tracker+portal process and each relay hold one LISTEN connection."""
    names = wait_for(lambda: listeners(fleet) >= {"rly events relay-a", "rly events relay-b"}, 10,
                     "relay listeners")  # fmt: skip
    assert names
    assert len(listeners(fleet)) == 3  # the tracker+portal process is the third


def test_approval_through_portal_reaches_other_process(fleet: Fleet, alice: PortalUser) -> None:
    """An Approve click in the portal process lets a technician on relay-b in well within 1 s."""
    delays = []
    for _ in range(3):
        tech, delay = approved_technician(fleet, "relay-b", alice)
        delays.append(delay)
        tech.close()
    print("approval delays", delays)
    assert max(delays) < CONTRACT, delays
    assert sorted(delays)[1] < NOTIFY_BOUND, delays


def test_close_repair_revoke_cross_node(fleet: Fleet, alice: PortalUser) -> None:
    """close SESSION-ID, repair and revoke issued on one node act on the other within 1 s."""
    device = fleet.enroll_device("nas-ev")
    tunnel = fleet.wait_online(device.id)
    holder = tunnel.relay_node
    other = next(name for name in fleet.relays if name != holder)

    worker, _ = approved_technician(fleet, holder, alice)
    worker.sendline(f"connect {device.id}")
    worker.expect(r"[#$] ", timeout=20)
    with fleet.db() as s:
        session_id = s.scalar(
            select(SshSession.id).where(
                SshSession.device_id == device.id, SshSession.ended_at.is_(None)
            )
        )
    assert session_id
    closer, _ = approved_technician(fleet, other, alice)
    asked = time.monotonic()
    closer.sendline(f"close {session_id}")
    worker.expect("closed: closed by alice")
    close_delay = time.monotonic() - asked
    closer.expect(f"Asked session {session_id} to close")

    closer.sendline(f"repair {device.id}")
    closer.expect("Step 3")
    repair_delay = _drop_delay(fleet, device.id, tunnel.id)
    fresh = fleet.wait_online(device.id)
    closer.expect("Repaired: a new tunnel is up.", timeout=15)  # wherever placement put it

    fleet.cli("device", "revoke", device.id)
    revoke_delay = _drop_delay(fleet, device.id, fresh.id)
    worker.close()
    closer.close()
    delays = {"close": close_delay, "repair": repair_delay, "revoke": revoke_delay}
    print("cross-node delays", delays)
    assert max(delays.values()) < CONTRACT, delays
    assert min(delays.values()) < NOTIFY_BOUND, delays


def _drop_delay(fleet: Fleet, device_id: str, tunnel_id: int) -> float:
    """Seconds from the device's tunnel request to the tunnel row's close (both DB stamps)."""

    def closed() -> float | None:
        with fleet.db() as s:
            closed_at = s.scalar(select(Tunnel.closed_at).where(Tunnel.id == tunnel_id))
            asked = s.scalar(select(Device.tunnel_request_at).where(Device.id == device_id))
        if closed_at is None or asked is None:
            return None
        return max((closed_at - asked).total_seconds(), 1e-6)

    return wait_for(closed, 10, f"tunnel {tunnel_id} closed")


def test_listener_reconnects_after_losing_its_connection(fleet: Fleet, alice: PortalUser) -> None:
    """A LISTEN connection killed on the server comes back within seconds and events flow again."""
    with fleet.db() as s, s.begin():
        killed = s.scalar(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'rly events relay-b'"
            )
        )
    assert killed == 1
    wait_for(lambda: "rly events relay-b" in listeners(fleet), 10, "relay-b listening again")
    tech, delay = approved_technician(fleet, "relay-b", alice)
    tech.close()
    assert delay < CONTRACT


def test_polling_fallback_without_listen(fleet: Fleet, alice: PortalUser) -> None:
    """A relay with database_notify = false holds no LISTEN and still sees approvals in 1 s."""
    fleet.add_relay("relay-c", "127.0.1.3", database_notify=False)
    try:
        assert "rly events relay-c" not in listeners(fleet)
        tech, delay = approved_technician(fleet, "relay-c", alice)
        tech.close()
        assert delay < CONTRACT
        assert "rly events relay-c" not in listeners(fleet)
    finally:
        fleet.relays.pop("relay-c").stop()
