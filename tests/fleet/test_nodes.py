"""The node registry, placement, drain and tunnel mode, with three real relays on one PostgreSQL.

One fleet for the module: tracker+portal and relay-a/b/c on 127.0.1.1-3,
heartbeats every 0.5 s (gone after 1.5 s), real rly-clients (builtin
target) and a real OpenSSH technician. The tests run in file order: drain
and kill -9 come last because they change the fleet.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select, text, update

from core.models import AuditEvent, Device, RelayNode, SshSession, Tunnel
from tests.e2e.stack import DeviceUnderTest
from tests.fleet.support import URL_RE, Fleet, PortalUser, wait_for
from tracker.placement import NodeEndpoint, rank

NODES = {"relay-a": "127.0.1.1", "relay-b": "127.0.1.2", "relay-c": "127.0.1.3"}
FAST = {"relay": {"keepalive_interval": "2s", "keepalive_count": 2, "heartbeat_interval": "500ms"}}


@pytest.fixture(scope="module")
def fleet(fleet_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Three relays with fast heartbeats; four devices placed by the tracker."""
    fleet = Fleet(tmp_path_factory.mktemp("nodes"), fleet_db)
    fleet.relay_config = FAST
    try:
        for name, address in NODES.items():
            fleet.add_relay(name, address)
        for n in range(4):  # so some node holds two (the drain test needs an idle one)
            fleet.enroll_device(f"nas-{n}")
        for device in fleet.devices:
            fleet.wait_online(device.id)
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def alice(fleet: Fleet) -> PortalUser:
    return fleet.portal_user("alice")


def holder(fleet: Fleet, device: DeviceUnderTest) -> str:
    tunnel = fleet.open_tunnel(device.id)
    assert tunnel is not None, f"{device.id} has no tunnel"
    return tunnel.relay_node


def first_choice(device_id: str, names: list[str]) -> str:
    nodes = [NodeEndpoint(n, NODES[n], (1,)) for n in names]
    return rank(device_id, nodes)[0].name


def relay_list(fleet: Fleet) -> dict[str, list[str]]:
    """`rly relay list` as {node: [state, age, 'ago', tunnels, sessions, ...]}."""
    lines = fleet.cli("relay", "list").splitlines()
    assert lines[0].split()[:5] == ["NODE", "STATE", "HEARTBEAT", "TUNNELS", "SESSIONS"]
    return {line.split()[0]: line.split()[1:] for line in lines[1:]}


def test_rendezvous_moves_only_the_lost_nodes_devices() -> None:
    """Dropping one node from the ranking changes the first choice only of its own devices."""
    names = list(NODES)
    devices = [f"dev{i:05d}" for i in range(3000)]
    before = {d: first_choice(d, names) for d in devices}
    after = {d: first_choice(d, names[:2]) for d in devices}
    moved = {d for d in devices if before[d] != after[d]}
    assert moved == {d for d in devices if before[d] == "relay-c"}
    shares = [sum(1 for d in devices if before[d] == n) for n in names]
    assert min(shares) > 800, shares  # an even spread, roughly a third each


def test_devices_land_on_their_first_choice(fleet: Fleet) -> None:
    """Each rly-client dials the relays in the order the tracker's check-in answer gives."""
    for device in fleet.devices:
        expected = first_choice(device.id, list(NODES))
        wait_for(
            lambda d=device, e=expected: holder(fleet, d) == e, 20, f"{device.id} on {expected}"
        )


def test_relay_list_shows_live_nodes_with_load(fleet: Fleet) -> None:
    """`rly relay list` shows every node live, a fresh heartbeat, and its open tunnels."""
    rows = relay_list(fleet)
    assert set(rows) == set(NODES)
    for name, row in rows.items():
        state, age, _ago, tunnels, sessions = row[:5]
        assert state == "live", rows
        assert float(age.rstrip("s")) <= 2, rows
        expected = sum(1 for d in fleet.devices if holder(fleet, d) == name)
        assert (int(tunnels), int(sessions)) == (expected, 0), rows
    with fleet.db() as s:  # each node's own heartbeat carries its load too
        load = dict(s.execute(select(RelayNode.name, RelayNode.tunnels)).all())
    assert sum(load.values()) == len(fleet.devices), load
    for args, error in (
        (("relay", "drain", "relay-x"), "relay node 'relay-x' is not registered"),
        (("relay", "drain", "relay-a", "--deadline", "soon"), "--deadline: not a duration"),
        (("relay", "resume", "relay-a"), "relay node relay-a is not draining"),
    ):
        refused = fleet.hub.run_cli(*args)
        assert (refused.returncode, refused.stdout) == (2, ""), refused
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"rly: {error}"), refused.stderr
    assert relay_list(fleet)["relay-a"][0] == "live"  # nothing changed


def test_open_is_never_sent_to_a_device_tunnelled_elsewhere(fleet: Fleet) -> None:
    """An `open` request for a device whose tunnel is up on some node is cleared, not sent."""
    device = fleet.devices[0]
    with fleet.db() as s, s.begin():
        s.execute(
            update(Device)
            .where(Device.id == device.id)
            .values(tunnel_request="open", tunnel_request_at=func.now())
        )
        s.execute(text("SELECT pg_notify('rly_events', :t)"), {"t": f"device:{device.id}"})
    wait_for(lambda: fleet_request(fleet, device.id) is None, 5, "the open request cleared")
    assert device.process is not None
    time.sleep(0.5)
    assert "tracker asks: open" not in device.process.output


def fleet_request(fleet: Fleet, device_id: str) -> str | None:
    with fleet.db() as s:
        return s.scalar(select(Device.tunnel_request).where(Device.id == device_id))


def test_device_mode_from_the_cli(fleet: Fleet) -> None:
    """`rly device mode` is audited, reaches the device's long poll at once, refuses bad input."""
    device = fleet.devices[1]
    state_file = device.config_path.with_suffix(".state.json")
    wait_for(lambda: "last_checkin" in state_file.read_text(), 10, "a first check-in")
    time.sleep(1.0)  # the client is back in its long poll
    before = json.loads(state_file.read_text())["last_checkin"]
    out = fleet.cli("device", "mode", device.id, "on-demand")
    assert f"device {device.id} tunnel mode on-demand" in out
    with fleet.db() as s:
        assert s.get_one(Device, device.id).tunnel_mode == "on-demand"
        assert (
            s.scalar(
                select(AuditEvent.detail).where(
                    AuditEvent.action == "device.tunnel_mode", AuditEvent.target == device.id
                )
            )
            == "mode=on-demand was=persistent"
        )
    # the device's long poll was answered at once (it would otherwise last 25 s)
    wait_for(lambda: json.loads(state_file.read_text())["last_checkin"] > before, 3, "an answer")
    again = fleet.hub.run_cli("device", "mode", device.id, "on-demand")
    assert again.returncode == 2 and "already on-demand" in again.stderr
    bad = fleet.hub.run_cli("device", "mode", device.id, "sometimes")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    fleet.cli("device", "mode", device.id, "persistent")


def test_drain_moves_devices_and_ends_sessions_after_the_deadline(
    fleet: Fleet, alice: PortalUser
) -> None:
    """Draining a node moves its idle devices at once, its busy one after the deadline."""
    holders = [holder(fleet, d) for d in fleet.devices]
    target = max(NODES, key=holders.count)
    on_target = [d for d, h in zip(fleet.devices, holders, strict=True) if h == target]
    assert len(on_target) >= 2  # one busy, at least one idle
    busy = on_target[0]
    tech = fleet.technician(fleet.relays[target])
    alice.decide(tech.expect(URL_RE).group(2))
    tech.expect(re.escape("rly:alice@acme> "))
    tech.sendline(f"connect {busy.id}")
    tech.expect(r"[#$] ", timeout=20)
    started = time.monotonic()
    out = fleet.cli("relay", "drain", target, "--deadline", "4s")
    assert f"relay {target} draining" in out
    for device in on_target[1:]:
        wait_for(lambda d=device: _elsewhere(fleet, d, target), 10, f"{device.id} moved")
    assert holder(fleet, busy) == target  # its session is still running
    assert relay_list(fleet)[target][0] == "draining"
    tech.expect("closed: closed by relay drain", timeout=15)
    assert time.monotonic() - started >= 3.5  # not before the deadline
    wait_for(lambda: _elsewhere(fleet, busy, target), 15, f"{busy.id} moved")
    wait_for(lambda: relay_list(fleet)[target][0] == "drained", 10, f"{target} drained")
    for device in fleet.devices:
        fleet.wait_online(device.id)  # no device left offline
        assert holder(fleet, device) != target
    tech.close()
    fleet.cli("relay", "resume", target)
    assert relay_list(fleet)[target][0] == "live"


def _elsewhere(fleet: Fleet, device: DeviceUnderTest, node: str) -> bool:
    tunnel = fleet.open_tunnel(device.id)
    return tunnel is not None and tunnel.relay_node != node


def test_kill9_node_is_declared_gone_and_its_devices_move(fleet: Fleet) -> None:
    """kill -9 of a relay: another node closes its rows with `node gone`, its devices return."""
    victim = holder(fleet, fleet.devices[2])
    moved = [d for d in fleet.devices if holder(fleet, d) == victim]
    fleet.relays[victim].kill()
    killed = time.monotonic()

    def rows_closed() -> bool:
        with fleet.db() as s:
            return not s.scalar(
                select(func.count())
                .select_from(Tunnel)
                .where(Tunnel.relay_node == victim, Tunnel.closed_at.is_(None))
            )

    wait_for(rows_closed, 10, f"{victim}'s tunnel rows closed")
    assert time.monotonic() - killed < 5  # 3 heartbeats of 0.5 s, and a beat of the noticer
    with fleet.db() as s:
        reasons = set(
            s.scalars(select(Tunnel.close_reason).where(Tunnel.relay_node == victim)).all()
        )
        declared = s.scalars(
            select(AuditEvent.actor).where(
                AuditEvent.action == "relay.gone", AuditEvent.target == victim
            )
        ).all()
        open_sessions = s.scalar(
            select(func.count())
            .select_from(SshSession)
            .where(SshSession.relay_node == victim, SshSession.ended_at.is_(None))
        )
    assert "node gone" in reasons
    assert len(declared) == 1 and declared[0] != victim  # whoever noticed first, once
    assert open_sessions == 0
    assert relay_list(fleet)[victim][0] == "gone"
    for device in moved:
        wait_for(lambda d=device: _elsewhere(fleet, d, victim), 20, f"{device.id} moved")
