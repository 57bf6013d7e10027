"""Sessions over per-session data connections, with every real part but the browser.

One `rly serve` per module; devices are real `rly-client`s (targets: a real
sshd, and the builtin server), the technician is OpenSSH `ssh`/`scp`/`sftp`,
approvals are decided in the database as the portal would. Each test asserts
the path the session really took (`sessions.path`, the `session.start` audit).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Account, DataConnection, Device, SshSession
from tests.adversarial.hostile import HostileTarget
from tests.adversarial.proxy import TcpProxy
from tests.e2e.stack import DeviceUnderTest, Stack, wait_for
from tests.relay.device_port_support import host_ca_public, new_key
from tests.relay.test_jump import GATE_PASSWORD, VERIFIED, Transfer
from tests.relay.test_technician_support import TechDb, approval_token, approve, device_tunnel
from tests.support.procs import ProcessFactory
from tests.support.rly_server import RlyFactory
from tests.support.sshd import SshdFactory
from tests.support.technician import Technician, TechnicianFactory

pytestmark = pytest.mark.slow
CONFIG = {"relay": {"connect_timeout": "5s", "keepalive_interval": "2s", "keepalive_count": 2}}
PROMPT = re.escape("rly:alice@acme> ")


@dataclass
class World:
    stack: Stack
    db: TechDb
    nas: DeviceUnderTest  # sshd target
    tiny: DeviceUnderTest  # builtin target
    ssh_config: Path

    @property
    def port(self) -> int:
        return self.stack.server.technician_port

    def menu(self, factory: TechnicianFactory) -> Technician:
        tech = factory(self.port)
        approve(tech, self.db, "alice")  # waits for the prompt
        return tech

    def sessions(self, device_id: str) -> list[SshSession]:
        with self.stack.db() as s:
            query = select(SshSession).where(SshSession.device_id == device_id)
            return list(s.scalars(query.order_by(SshSession.started_at)))

    def last_session(self, device_id: str) -> SshSession:
        return wait_for(lambda: (self.sessions(device_id) or [None])[-1], 5, "a session row")


def _ssh_config(stack: Stack, workdir: Path) -> Path:
    """Host alias `relay` for the technician port; device names verified by the host CA."""
    known = workdir / "known_hosts"
    known.write_text(f"@cert-authority * {host_ca_public(stack.server.data_dir)}\n")
    config = workdir / "ssh_config"
    config.write_text(
        f"Host relay\n  HostName 127.0.0.1\n  Port {stack.server.technician_port}\n"
        f"  User partner\nHost *\n  UserKnownHostsFile {known}\n"
        "  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n"
        "  PubkeyAuthentication no\n  NumberOfPasswordPrompts 1\n  LogLevel INFO\n"
    )
    return config


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One relay with account acme, user alice and two rly-client devices, both online."""
    workdir = tmp_path_factory.mktemp("data-path")
    servers, processes, sshds = RlyFactory(workdir), ProcessFactory(workdir), SshdFactory(workdir)
    db: TechDb | None = None
    try:
        stack = Stack(servers(config=CONFIG), processes, sshds, workdir)
        db = TechDb(stack.server.data_dir)
        db.add_user("alice", "acme")
        nas = stack.enroll_device(hostname="dp-nas", serial="SN-DP-1")
        tiny = stack.enroll_device(hostname="dp-tiny", serial="SN-DP-2", target="builtin")
        for device in (nas, tiny):
            device.start()
        for device in (nas, tiny):
            stack.wait_online(device.id)
        yield World(stack, db, nas, tiny, _ssh_config(stack, workdir))
    finally:
        if db is not None:
            db.close()
        processes.stop_all()
        sshds.stop_all()
        servers.stop_all()


def _assert_data_path(world: World, row: SshSession) -> None:
    """The row, its start audit and its redeemed ticket all say `data`."""
    assert row.path == "data", row.path
    starts = [
        e.detail for e in world.db.actions("session.start") if f"session={row.id}" in e.detail
    ]
    assert starts == [f"session={row.id} path=data"]
    with world.stack.db() as s:
        ticket = s.scalar(select(DataConnection).where(DataConnection.session_id == row.id))
    assert ticket is not None and ticket.used_at is not None and ticket.peer_ip == "127.0.0.1"


@pytest.mark.parametrize("which", ["nas", "tiny"])
def test_menu_connect_runs_over_a_data_connection(
    world: World, technician_factory: TechnicianFactory, which: str
) -> None:
    """`connect` reaches the device's shell over a data connection (sshd and builtin targets)."""
    device: DeviceUnderTest = getattr(world, which)
    tech = world.menu(technician_factory)
    tech.sendline(f"connect {device.id}")
    tech.sendline("echo data-$((6*7)); echo $TERM")
    tech.expect("data-42")
    tech.expect("xterm-256color")
    row = world.last_session(device.id)
    _assert_data_path(world, row)
    tech.sendline("exit")
    tech.expect(rf"Connection to {device.id} \(dp-\w+\) closed: exit 0\.")
    tech.expect(PROMPT)
    tech.sendline(f"show {device.id}")
    tech.expect(r"Sessions: none")
    ended = wait_for(lambda: world.last_session(device.id).ended_at, 5, "session end")
    assert ended is not None


def test_show_lists_the_data_connection(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """While a session runs, `show` names its path and the data connection's peer."""
    device = world.nas
    tech = world.menu(technician_factory)
    tech.sendline(f"connect {device.id}")
    tech.sendline("echo ready-$((2+3))")
    tech.expect("ready-5")
    other = world.menu(technician_factory)
    other.sendline(f"show {device.id}")
    other.expect(r"path data, data connection from 127\.0\.0\.1:\d+")
    other.expect(PROMPT)
    tech.sendline("exit")
    tech.expect(PROMPT)


@pytest.mark.parametrize("which", ["nas", "tiny"])
def test_exec_connect_passes_exit_status_over_data(
    world: World, technician_factory: TechnicianFactory, which: str
) -> None:
    """`ssh -t partner@relay connect DEV` gives a shell over a data connection with its status."""
    device: DeviceUnderTest = getattr(world, which)
    tech = technician_factory(world.port, args=["-t"], command=["connect", device.id])
    approve_jump(tech, world)
    tech.expect(r"[#$] ")  # typed before approval, a line would go to the approval wait
    tech.sendline("echo exec-$((7*6))")
    tech.expect("exec-42")
    tech.sendline("exit 7")
    assert tech.expect_eof() == 7
    _assert_data_path(world, world.last_session(device.id))


def _jump(factory: TechnicianFactory, world: World, device: str, command: list[str]) -> Technician:
    return factory(
        22,
        user="root",
        host=device,
        password=GATE_PASSWORD,
        args=["-F", str(world.ssh_config), "-J", "relay"],
        options=VERIFIED,
        command=command,
    )


@pytest.mark.parametrize("which", ["nas", "tiny"])
def test_proxyjump_exec_over_data(
    world: World, technician_factory: TechnicianFactory, which: str
) -> None:
    """`ssh -J partner@relay root@DEV cmd` runs over a data connection and passes its status."""
    device: DeviceUnderTest = getattr(world, which)
    host = device.id.lower()
    tech = _jump(technician_factory, world, host, ["echo jump-$((5*5)); exit 4"])
    approve_jump(tech, world)
    tech.expect("jump-25")
    assert tech.expect_eof() == 4
    _assert_data_path(world, world.last_session(device.id))


def approve_jump(tech: Technician, world: World) -> None:
    """Approve a session that shows no menu (`-t connect`, ProxyJump)."""
    world.db.decide(approval_token(tech), "alice")


def test_scp_and_sftp_over_data(world: World, tmp_path: Path) -> None:
    """scp up and down and an sftp batch run over data connections, byte for byte."""
    host = world.nas.id.lower()
    payload = os.urandom(2_000_000)
    local, remote, back = tmp_path / "up.bin", tmp_path / "on-device.bin", tmp_path / "down.bin"
    local.write_bytes(payload)
    scp = ["/usr/bin/scp", "-F", str(world.ssh_config), "-J", "relay"]
    before = len(world.sessions(world.nas.id))
    for argv in (
        [*scp, str(local), f"root@{host}:{remote}"],
        [*scp, f"root@{host}:{remote}", str(back)],
    ):
        transfer = Transfer(argv)
        transfer.approve(world.db)
        status, out = transfer.finish()
        assert status == 0, out
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(payload).digest()
    batch = tmp_path / "batch"
    got = tmp_path / "got.bin"
    batch.write_text(f"put {local} {remote}.2\nget {remote}.2 {got}\n")
    sftp = Transfer(
        [
            "/usr/bin/sftp",
            "-F",
            str(world.ssh_config),
            "-J",
            "relay",
            "-b",
            str(batch),
            f"root@{host}",
        ]
    )
    sftp.approve(world.db)
    status, out = sftp.finish()
    assert status == 0, out
    assert got.read_bytes() == payload
    rows = wait_for(
        lambda: [r for r in world.sessions(world.nas.id)[before:] if r.ended_at] or None, 10, "ends"
    )
    assert len(rows) == 3
    for row in rows:
        _assert_data_path(world, row)
    assert sum(r.bytes_up for r in rows) >= 2 * len(payload)


def test_recording_and_audit_of_a_data_session(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """A data-path session is recorded as asciicast and audited start to end like a tunnel one."""
    device = world.nas
    tech = world.menu(technician_factory)
    tech.sendline(f"connect {device.id}")
    tech.sendline("echo recorded-$((9*9))")
    tech.expect("recorded-81")
    tech.sendline("exit")
    tech.expect(PROMPT)
    row = wait_for(
        lambda: (lambda r: r if r.ended_at else None)(world.last_session(device.id)), 5, "end"
    )
    _assert_data_path(world, row)
    assert row.recording_path is not None
    cast = Path(row.recording_path).read_text()
    assert '"version": 2' in cast.splitlines()[0] and "recorded-81" in cast
    ends = [e.detail for e in world.db.actions("session.end") if f"session={row.id}" in e.detail]
    assert (
        len(ends) == 1 and "reason=exit 0" in ends[0] and f"bytes_down={row.bytes_down}" in ends[0]
    )


def test_plain_openssh_device_uses_the_tunnel(
    world: World, technician_factory: TechnicianFactory, process_factory: ProcessFactory
) -> None:
    """An `ssh -N -R` device is never asked to dial: its session runs through the tunnel."""
    key = new_key()
    device_id = world.db.add_named_device(_acme_id(world), hostname="dp-plain", key=key)
    assert world.nas.target is not None
    device_tunnel(process_factory, world.stack.server, device_id, key, world.nas.target.port)
    world.stack.wait_online(device_id)
    tech = world.menu(technician_factory)
    started = time.monotonic()
    tech.sendline(f"connect {device_id}")
    tech.sendline("echo plain-$((3*3))")
    tech.expect("plain-9")
    assert time.monotonic() - started < 3.0  # under the 3 s data-connection wait: none
    row = world.last_session(device_id)
    assert row.path == "tunnel"
    with world.stack.db() as s:
        assert s.scalar(select(DataConnection).where(DataConnection.session_id == row.id)) is None
    tech.sendline("exit")
    tech.expect(PROMPT)


def _acme_id(world: World) -> int:
    with world.stack.db() as s:
        account = s.scalar(select(Account).where(Account.name == "acme"))
        assert account is not None
        return account.id


def test_kill_9_of_the_client_ends_the_session_with_a_message(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """kill -9 of rly-client mid-session ends the technician's session with a message."""
    device = world.tiny
    tech = world.menu(technician_factory)
    tech.sendline(f"connect {device.id}")
    tech.sendline("echo alive-$((4*4))")
    tech.expect("alive-16")
    _assert_data_path(world, world.last_session(device.id))
    assert device.process is not None
    os.killpg(device.process.pid, signal.SIGKILL)
    tech.expect(rf"Connection to {device.id} \(dp-tiny\) closed: connection to the device lost\.")
    tech.expect(PROMPT)
    row = wait_for(
        lambda: (lambda r: r if r.ended_at else None)(world.last_session(device.id)), 5, "end"
    )
    assert row.end_reason == "connection to the device lost"
    device.start()  # leave the shared device online for the tests after this one
    world.stack.wait_online(device.id)


class TunnelOnlyProxy(TcpProxy):
    """Passes its first connection (the device's tunnel) on; later ones (data connections)
    are accepted and held silent, a site that lets only one connection out."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections == 0:
            await super()._serve(reader, writer)
            return
        self.connections += 1
        self._writers.add(writer)
        await self._swallow(reader)


def test_blocked_data_connections_fall_back_to_the_tunnel(
    rly_factory: RlyFactory,
    process_factory: ProcessFactory,
    sshd_factory: SshdFactory,
    technician_factory: TechnicianFactory,
    tmp_path: Path,
) -> None:
    """A device whose data connections never arrive still gets its sessions, through the
    tunnel, once relay.data_connect_timeout has passed."""
    config = {"relay": {"public_host": "127.0.0.9", "data_connect_timeout": "1s"}}  # unreachable
    stack = Stack(rly_factory(config=config), process_factory, sshd_factory, tmp_path)
    db = TechDb(stack.server.data_dir)
    try:
        db.add_user("alice", "acme")
        device = stack.enroll_device(hostname="walled")
        with TunnelOnlyProxy(stack.server.device_port).start() as proxy:
            device.edit_config(relay_hosts=["127.0.0.1"], relay_ports=[proxy.port])
            device.start()
            stack.wait_online(device.id)
            tech = technician_factory(stack.server.technician_port)
            approve(tech, db, "alice")
            started = time.monotonic()
            tech.sendline(f"connect {device.id}")
            tech.sendline("echo walled-$((8*8))")
            tech.expect("walled-64")
            took = time.monotonic() - started
            assert 1.0 <= took < 4.0, took
            rows = db.sessions_of(device.id)
            assert [r.path for r in rows] == ["tunnel"]
            start = [e.detail for e in db.actions("session.start")]
            assert start == [f"session={rows[0].id} path=tunnel"]
            with stack.db() as s:
                ticket = s.scalar(
                    select(DataConnection).where(DataConnection.session_id == rows[0].id)
                )
            assert ticket is not None and ticket.used_at is None  # asked for, never redeemed
            assert proxy.connections >= 2  # the device did dial: the proxy held it
            tech.sendline("exit")
            tech.expect(PROMPT)
    finally:
        db.close()


def test_close_session_ends_a_data_session(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """`close SESSION-ID` from another menu ends a session that runs on a data connection."""
    device = world.nas
    first = world.menu(technician_factory)
    first.sendline(f"connect {device.id}")
    first.sendline("echo in-$((1+2))")
    first.expect("in-3")
    row = world.last_session(device.id)
    _assert_data_path(world, row)
    second = world.menu(technician_factory)
    second.sendline(f"close {row.id}")
    second.expect(f"Asked session {row.id} to close")
    first.expect("closed: closed by alice", timeout=5)
    first.expect(PROMPT)


def test_changed_host_key_on_the_data_path_raises_the_alert(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """Over a data connection a target key other than the pin is refused with the ALERT and
    audited, and the session does not fall back to the tunnel."""
    device = world.tiny
    pinned = world.stack.device_row(device.id).target_host_key
    other = new_key().export_public_key().decode().strip()
    _set_pin(world, device.id, other)
    try:
        before = len(world.db.actions("device.host_key_mismatch"))
        tech = world.menu(technician_factory)
        tech.sendline(f"connect {device.id}")
        tech.expect(f"ALERT: device {device.id} presented a host key other than its pin.")
        tech.expect(PROMPT)
        assert len(world.db.actions("device.host_key_mismatch")) == before + 1
        row = world.last_session(device.id)
        assert row.path == "data"  # refused on the data path; no second try through the tunnel
    finally:
        _set_pin(world, device.id, pinned)


def _set_pin(world: World, device_id: str, key_line: str | None) -> None:
    def run(session: Session) -> None:
        found = session.get(Device, device_id)
        assert found is not None
        found.target_host_key = key_line

    world.db.run(run)


def test_close_device_ends_its_data_sessions(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """`close DEVICE` from another menu drops the tunnel and with it the sessions running on
    its data connections, as it ends in-tunnel sessions."""
    device = world.nas
    first = world.menu(technician_factory)
    first.sendline(f"connect {device.id}")
    first.sendline("echo held-$((5+6))")
    first.expect("held-11")
    _assert_data_path(world, world.last_session(device.id))
    second = world.menu(technician_factory)
    second.sendline(f"close {device.id}")
    second.expect(f"Closed the tunnel of device {device.id}")
    first.expect(rf"Connection to {device.id} \(dp-nas\) closed: connection to the device lost\.")
    first.expect(PROMPT)
    world.stack.wait_online(device.id, timeout=device.backoff_cap + 15)  # persistent: it returns


def test_on_demand_device_opens_its_tunnel_then_a_data_connection(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """An on-demand device without a tunnel is asked for one through its check-in; the
    session then runs on a data connection, and the tunnel stays up while it does."""
    stack = world.stack
    device = stack.enroll_device(hostname="dp-lazy", serial="SN-DP-3", target="builtin")
    stack.server.run_cli("device", "mode", device.id, "on-demand", check=True)
    device.edit_config(tunnel_mode="on-demand", idle_timeout=1.0)
    device.start()
    wait_for(lambda: stack.device_row(device.id).last_checkin_at, 15, "a first check-in")
    assert stack.open_tunnel(device.id) is None
    tech = world.menu(technician_factory)
    started = time.monotonic()
    tech.sendline(f"connect {device.id}")
    tech.sendline("echo lazy-$((6*6))")
    tech.expect("lazy-36", timeout=15)
    took = time.monotonic() - started
    _assert_data_path(world, world.last_session(device.id))
    time.sleep(2.0)  # beyond idle_timeout: the open data connection keeps the tunnel
    assert stack.open_tunnel(device.id) is not None
    tech.sendline("echo still-$((7*7))")
    tech.expect("still-49")
    tech.sendline("exit")
    tech.expect(PROMPT)
    print(f"on-demand connect to shell output: {took:.2f} s")
    stack.wait_offline(device.id, timeout=10)  # idle again: the tunnel goes


def test_a_silent_target_is_given_up_once_not_twice(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """A target that never answers on the data connection gives `Giving up. Cannot connect`
    within connect_timeout (5 s) + 3 s: no second wait through the tunnel."""
    stack = world.stack
    with HostileTarget("silence").start() as target:
        device = stack.enroll_device(hostname="dp-mute", serial="SN-DP-4")
        device.edit_config(target_port=target.port)
        device.start()
        stack.wait_online(device.id)
        tech = world.menu(technician_factory)
        started = time.monotonic()
        tech.sendline(f"connect {device.id}")
        tech.expect("Giving up. Cannot connect", timeout=15)
        took = time.monotonic() - started
        tech.expect(PROMPT)
        assert took < 5 + 3, took
        assert world.last_session(device.id).path == "data"
        assert device.process is not None
        device.process.stop()
