"""Dial-back across two real relays on one PostgreSQL (relay-a 127.0.1.1, relay-b 127.0.1.2).

A real rly-client (sshd target) holds its tunnel at relay-b; a real OpenSSH
technician on relay-a reaches it by menu `connect`, `-t connect`, ProxyJump
scp and sftp, and each session's data connection is dialled by the device
straight to relay-a (path dial-back): relay-b only passed the request on.
A device behind a web proxy that lets it reach relay-b only (a network
namespace whose one way out is a tinyproxy with a host allowlist) is
reached over peering instead, and after one failed dial-back at once.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from core.models import DataConnection, SshSession, Tunnel
from tests.e2e.stack import CLIENT, DeviceUnderTest
from tests.fleet.support import Fleet, wait_for
from tests.peering.support import PROMPT, FleetDb, TwoRelays, scp_sftp_round_trip, ssh_config
from tests.relay.test_technician_support import approval_token
from tests.support.sshd import SshdFactory
from tests.support.technician import TechnicianFactory
from tests.transport.support import WebFirewall

pytestmark = pytest.mark.slow


@dataclass
class World(TwoRelays):
    device: DeviceUnderTest
    ssh_config: Path

    def ended(self, device_id: str, count: int) -> list[SshSession]:
        """The device's first `count` sessions once all of them have ended."""

        def check() -> list[SshSession] | None:
            rows = self.db.session_rows(device_id)
            done = [r for r in rows if r.ended_at]
            return done if len(done) >= count and len(rows) == len(done) else None

        return wait_for(check, 15, f"{count} ended sessions of {device_id}")

    def data_rows(self, session_id: str) -> list[DataConnection]:
        return self.db.run(
            lambda s: list(
                s.scalars(select(DataConnection).where(DataConnection.session_id == session_id))
            )
        )


def at_b_only(fleet: Fleet, device: DeviceUnderTest, **config: object) -> None:
    """(Re)start the device with relay-b as its only relay endpoint."""
    device.edit_config(relay_endpoints=[f"ssh://127.0.1.2:{fleet.relays['relay-b'].device_port}"])
    if config:
        device.edit_config(**config)


@pytest.fixture(scope="module")
def world(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """alice on account acme; an rly-client with a real sshd target, its tunnel on relay-b."""
    workdir = tmp_path_factory.mktemp("dial-back")
    db = FleetDb(fleet.database_url)
    sshds = SshdFactory(workdir)
    try:
        db.add_user("alice", "acme")
        user_ca = (fleet.hub.data_dir / "keys" / "user_ca.pub").read_text().strip()
        target = sshds(trusted_user_ca_keys=[user_ca])
        device = fleet.enroll_device("dial-nas", sshd_port=target.port, start=False)
        at_b_only(fleet, device)
        device.start()
        assert fleet.wait_online(device.id).relay_node == "relay-b"
        yield World(fleet, db, device, ssh_config(workdir, fleet.relays["relay-a"]))
    finally:
        sshds.stop_all()
        db.close()


def test_menu_connect_is_dialled_back_to_a(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """`show` on A says dial-back; the device's data connection lands on A (the ticket row is
    A's, used once); recording and audit are written once, on A, nothing on B."""
    dev = world.device.id
    tech = world.menu(technician_factory)
    tech.sendline(f"show {dev}")
    tech.expect(r"Tunnel: relay relay-b ")
    tech.expect(r"Reached from relay relay-a: by dial-back \(asked through relay relay-b; ")
    tech.expect(PROMPT)
    tech.sendline(f"connect {dev}")
    tech.sendline("echo dialled-$((6*7))")
    tech.expect("dialled-42")
    other = world.menu(technician_factory)
    other.sendline(f"show {dev}")
    other.expect(r", path dial-back, data connection from 127\.0\.0\.1:\d+")
    other.close()
    tech.sendline("exit")
    tech.expect(rf"Connection to {dev} \(dial-nas\) closed: exit 0\.")
    tech.expect(PROMPT)
    (row,) = world.ended(dev, 1)
    assert (row.path, row.relay_node) == ("dial-back", "relay-a")
    (data,) = world.data_rows(row.id)
    assert data.relay_node == "relay-a" and data.used_at is not None
    assert data.transport_port == world.a.device_port  # dialled to A's device port, not B's
    sid = row.id
    starts = [e.detail for e in world.db.audit_rows("session.start", f"session={sid}")]
    assert starts == [f"session={sid} path=dial-back"]
    assert len(world.db.audit_rows("session.end", f"session={sid}")) == 1
    assert row.recording_path is not None
    recording = Path(row.recording_path)
    assert recording.is_relative_to(world.a.data_dir) and "dialled-42" in recording.read_text()
    assert not list(world.b.data_dir.rglob(f"*{sid}*"))


def test_exec_connect_and_proxyjump_scp_sftp_are_dialled_back(
    world: World, technician_factory: TechnicianFactory, tmp_path: Path
) -> None:
    """`ssh -t … connect DEV cmd` passes the exit status; ProxyJump scp up and down and sftp
    move bytes intact; every session took the dial-back path on A."""
    dev = world.device.id
    before = len(world.db.session_rows(dev))
    tech = technician_factory(
        world.a.technician_port,
        host="127.0.1.1",
        args=["-t"],
        command=["connect", dev, "echo rc-$((8*8)); exit 3"],
        timeout=20,
    )
    world.db.decide(approval_token(tech), "alice")
    tech.expect("rc-64")
    assert tech.expect_eof() == 3
    scp_sftp_round_trip(world.db, world.ssh_config, dev, tmp_path)
    rows = world.ended(dev, before + 4)[before:]
    assert [(r.path, r.relay_node) for r in rows] == [("dial-back", "relay-a")] * 4


def test_close_device_on_a_ends_the_dialled_back_session(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """`close DEV` on A for the device tunnelled at B: the tunnel closes, and with it the
    session's data connection: the technician is told at once, and the device comes back."""
    dev = world.device.id
    tech = world.menu(technician_factory)
    tech.sendline(f"connect {dev}")
    tech.sendline("echo up-$((3*3))")
    tech.expect("up-9")
    admin = world.menu(technician_factory)
    asked = time.monotonic()
    admin.sendline(f"close {dev}")
    admin.expect(r"Asked device \S+ to close its tunnel \(held by another relay\)\.")
    tech.expect(rf"Connection to {dev} \(dial-nas\) closed", timeout=5)
    assert time.monotonic() - asked < 3.0
    tech.expect(PROMPT)
    admin.close()
    assert world.fleet.wait_online(dev).relay_node == "relay-b"  # persistent: it comes back


def test_draining_b_keeps_a_dialled_back_session_until_the_deadline(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """`rly relay drain relay-b --deadline 4s` while a session on relay-a rides the device's
    tunnel at relay-b: the device counts as busy, so its tunnel stays and the session runs
    until the deadline, then ends with the drain's words; after resume the device is back."""
    dev = world.device.id
    world.fleet.wait_online(dev)
    tech = world.menu(technician_factory)
    tech.sendline(f"connect {dev}")
    tech.sendline("echo before-$((5*5))")
    tech.expect("before-25")
    started = time.monotonic()
    assert "relay relay-b draining" in world.fleet.cli(
        "relay", "drain", "relay-b", "--deadline", "4s"
    )
    try:
        time.sleep(2.0)  # the drain has looked at least once (every second)
        tech.sendline("echo during-$((6*6))")
        tech.expect("during-36", timeout=5)
        tunnel = world.fleet.open_tunnel(dev)
        assert tunnel is not None and tunnel.relay_node == "relay-b"
        tech.expect(rf"Connection to {dev} \(dial-nas\) closed: closed by relay drain", timeout=15)
        assert time.monotonic() - started >= 3.5  # not before the deadline
        tech.expect(PROMPT)
    finally:
        world.fleet.cli("relay", "resume", "relay-b")
    wait_for(lambda: (t := world.fleet.open_tunnel(dev)) is not None and t.relay_node == "relay-b",
             20, "the device back on relay-b")  # fmt: skip


@pytest.fixture(scope="module")
def firewall(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebFirewall]:
    """A namespace whose one way out is a tinyproxy that lets it reach relay-b and the tracker
    only: a customer firewall with the relay allowlist of the seed."""
    fw = WebFirewall.create(tmp_path_factory.mktemp("only-b"))
    try:
        yield fw
    finally:
        fw.close()


def firewalled_device(
    world: World, fw: WebFirewall, hostname: str, *, on_demand: bool = False
) -> str:
    """An rly-client (builtin target) enrolled as usual, then run inside the namespace."""
    proxy = fw.proxy(allow_hosts=["127.0.0.1", "127.0.1.2"])  # the tracker, relay-b
    device = world.fleet.enroll_device(hostname, start=False)
    at_b_only(world.fleet, device, proxy=proxy.url())
    if on_demand:  # the tracker's mode, and the client's own until its first check-in
        world.fleet.cli("device", "mode", device.id, "on-demand")
        device.edit_config(tunnel_mode="on-demand")
    env = {"RLY_CLIENT_BACKOFF_CAP": "1"}
    fw.run([*CLIENT, "run", "--config", str(device.config_path)], name=hostname, env=env)
    return device.id


def test_a_device_that_may_reach_only_b_is_reached_over_peering(
    world: World, firewall: WebFirewall, technician_factory: TechnicianFactory
) -> None:
    """Its proxy refuses relay-a, so the dial-back cannot happen: after
    `relay.data_connect_timeout` the session runs over peering; the next one goes to
    peering at once, and `show` says so."""
    dev = firewalled_device(world, firewall, "only-b")
    assert world.fleet.wait_online(dev).relay_node == "relay-b"
    durations = []
    for word in ("first", "second"):
        started = time.monotonic()
        tech = technician_factory(
            world.a.technician_port,
            host="127.0.1.1",
            args=["-t"],
            command=["connect", dev, f"echo {word}-$((7*7)); exit 4"],
            timeout=20,
        )
        world.db.decide(approval_token(tech), "alice")
        tech.expect(f"{word}-49")
        durations.append(time.monotonic() - started)
        assert tech.expect_eof() == 4
    rows = world.ended(dev, 2)
    assert [(r.path, r.relay_node) for r in rows] == [("peering", "relay-a")] * 2
    assert durations[1] < durations[0] - 1.5, durations  # no second wait for a dial-back
    assert not [d for r in rows for d in world.data_rows(r.id) if d.used_at]
    tech = world.menu(technician_factory)
    tech.sendline(f"show {dev}")
    tech.expect(r"Reached from relay relay-a: via peering relay-b")
    tech.close()


def test_an_on_demand_device_that_may_reach_only_b_is_reached_from_a(
    world: World, firewall: WebFirewall, technician_factory: TechnicianFactory
) -> None:
    """`connect` on A to an on-demand device behind that proxy: A asks for the tunnel, it comes
    up on B, and the session runs (over peering) with no 'did not bring up its tunnel'."""
    dev = firewalled_device(world, firewall, "lazy-b", on_demand=True)
    time.sleep(1.5)
    assert world.fleet.open_tunnel(dev) is None  # on demand: no tunnel yet
    tech = world.menu(technician_factory)
    tech.sendline(f"connect {dev}")
    tech.expect("Waiting for connection")
    tech.sendline("echo lazy-$((5*9))")
    tech.expect("lazy-45", timeout=20)
    tech.sendline("exit")
    tech.expect(PROMPT)
    tunnel = world.fleet.open_tunnel(dev)
    assert tunnel is not None and tunnel.relay_node == "relay-b"
    rows = world.ended(dev, 1)
    assert [(r.path, r.relay_node) for r in rows] == [("peering", "relay-a")]


def test_revoking_the_device_ends_its_dialled_back_session_within_a_second(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """`rly device revoke` (at the tracker's host) mid-session: the session on A ends within
    1 s of the revocation (runs last: the device stays revoked)."""
    dev = world.device.id
    world.fleet.wait_online(dev)
    tech = world.menu(technician_factory)
    tech.sendline(f"connect {dev}")
    tech.sendline("echo live-$((2*21))")
    tech.expect("live-42")
    world.fleet.cli("device", "revoke", dev)
    revoked = time.monotonic()
    tech.expect(rf"Connection to {dev} \(dial-nas\) closed", timeout=5)
    assert time.monotonic() - revoked < 1.0
    rows = world.db.session_rows(dev)
    assert rows[-1].path == "dial-back"


def test_kill_9_of_b_ends_the_dialled_back_session_and_the_device_moves_to_a(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """kill -9 of relay-b mid-session (runs last: relay-b stays down): the device's tunnel, and
    with it the session's data connection to relay-a, end; the technician on relay-a is told
    within 5 s, and the device (relay-b first, then relay-a on its list) is back on relay-a."""
    device = world.fleet.enroll_device("two-relays", start=False)
    a_port, b_port = world.a.device_port, world.b.device_port
    device.edit_config(relay_endpoints=[f"ssh://127.0.1.2:{b_port}", f"ssh://127.0.1.1:{a_port}"])
    device.start()
    assert world.fleet.wait_online(device.id).relay_node == "relay-b"
    tech = world.menu(technician_factory)
    tech.sendline(f"connect {device.id}")
    tech.sendline("echo alive-$((4*4))")
    tech.expect("alive-16")
    assert world.b.process is not None
    killed = time.monotonic()
    os.killpg(world.b.process.pid, signal.SIGKILL)
    tech.expect(rf"Connection to {device.id} \(two-relays\) closed: ", timeout=5)
    assert time.monotonic() - killed < 5
    tech.expect(PROMPT)
    (row,) = world.ended(device.id, 1)
    assert (row.path, row.relay_node) == ("dial-back", "relay-a")

    def on_a() -> bool:  # relay-b's own row stays open until a live node declares it gone
        with world.fleet.db() as s:
            return bool(
                s.scalar(
                    select(Tunnel.id).where(
                        Tunnel.device_id == device.id,
                        Tunnel.relay_node == "relay-a",
                        Tunnel.closed_at.is_(None),
                    )
                )
            )

    wait_for(on_a, 15, "the device's tunnel on relay-a")
