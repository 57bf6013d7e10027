"""Relay peering across two real relays on one PostgreSQL (relay-a 127.0.1.1, relay-b 127.0.1.2).

A plain OpenSSH `ssh -R` device holds its tunnel at relay-b only; a real
OpenSSH technician on relay-a reaches it by menu `connect`, `-t connect`,
ProxyJump and scp, over relay-a's pooled peering connection to relay-b.
Peering logins and requests other than a device channel are refused and
audited; kill -9 of relay-b ends the session on relay-a with a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from core.keys import KeyStore
from core.models import SshSession
from relay.peering.pool import PeerPool, PeerUnavailable, split_address
from tests.fleet.support import Fleet, wait_for
from tests.peering.support import (
    PROMPT,
    FleetDb,
    TwoRelays,
    plain_device,
    scp_sftp_round_trip,
    ssh_config,
)
from tests.relay.device_port_support import new_key
from tests.relay.test_technician_support import approval_token
from tests.support.sshd import SshdFactory
from tests.support.technician import TechnicianFactory

pytestmark = pytest.mark.slow
SOURCE = ("127.0.9.9", 0)  # a source of its own: relay-a's pool is not affected


@dataclass
class World(TwoRelays):
    device_id: str
    ssh_config: Path


@pytest.fixture(scope="module")
def world(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """alice on account acme; a plain `ssh -R` device whose tunnel is on relay-b, sshd target."""
    workdir = tmp_path_factory.mktemp("peering")
    db = FleetDb(fleet.database_url)
    sshds = SshdFactory(workdir)
    try:
        db.add_user("alice", "acme")
        user_ca = (fleet.hub.data_dir / "keys" / "user_ca.pub").read_text().strip()
        target = sshds(trusted_user_ca_keys=[user_ca])
        key = new_key()
        device_id = db.add_named_device(db.account_id("acme"), hostname="peer-plain", key=key)
        plain_device(fleet.processes, fleet.relays["relay-b"], device_id, key, target.port)
        tunnel = fleet.wait_online(device_id)
        assert tunnel.relay_node == "relay-b"
        yield World(fleet, db, device_id, ssh_config(workdir, fleet.relays["relay-a"]))
    finally:
        sshds.stop_all()
        db.close()


def _ended(world: World) -> SshSession:
    def check() -> SshSession | None:
        rows = world.db.session_rows(world.device_id)
        return rows[-1] if rows and rows[-1].ended_at else None

    return wait_for(check, 10, "the session's end")


def test_registered_peering_addresses(world: World) -> None:
    """Each relay registers the peering address it bound (port 0: a free port) on its address."""
    for node, host in (("relay-a", "127.0.1.1"), ("relay-b", "127.0.1.2")):
        address = world.db.peer_address(node)
        got_host, port = split_address(address)
        assert got_host == host and port > 0, address


def test_menu_connect_reaches_a_device_on_another_relay(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """`show` on A says via peering B; `connect` on A runs the device shell, recorded and
    audited once, on A, with path peering."""
    tech = world.menu(technician_factory)
    tech.sendline(f"show {world.device_id}")
    tech.expect(r"Tunnel: relay relay-b ")
    tech.expect(r"Reached from relay relay-a: via peering relay-b")
    tech.expect(PROMPT)
    tech.sendline(f"connect {world.device_id}")
    tech.sendline("echo peer-$((6*7))")
    tech.expect("peer-42")
    other = world.menu(technician_factory)
    other.sendline(f"show {world.device_id}")
    other.expect(r", path peering")
    tech.sendline("exit")
    tech.expect(rf"Connection to {world.device_id} \(peer-plain\) closed: exit 0\.")
    tech.expect(PROMPT)
    row = _ended(world)
    assert row.path == "peering" and row.relay_node == "relay-a"
    sid = row.id
    starts = [e.detail for e in world.db.audit_rows("session.start", f"session={sid}")]
    ends = world.db.audit_rows("session.end", f"session={sid}")
    assert starts == [f"session={sid} path=peering"] and len(ends) == 1
    recording = Path(row.recording_path)
    assert recording.is_relative_to(world.a.data_dir) and "peer-42" in recording.read_text()
    assert not list(world.b.data_dir.rglob(f"*{sid}*"))  # nothing of it is written on B


def test_exec_connect_and_proxyjump_scp_across_relays(
    world: World, technician_factory: TechnicianFactory, tmp_path: Path
) -> None:
    """`ssh -t … connect DEV` passes the exit status, and ProxyJump scp and sftp move bytes
    intact, all from A to the device tunnelled at B."""
    tech = technician_factory(
        world.a.technician_port,
        host="127.0.1.1",
        args=["-t"],
        command=["connect", world.device_id],
        timeout=20,
    )
    world.db.decide(approval_token(tech), "alice")
    tech.expect(r"[#$] ")
    tech.sendline("exit 5")
    assert tech.expect_eof() == 5
    before = len(world.db.session_rows(world.device_id))
    scp_sftp_round_trip(world.db, world.ssh_config, world.device_id, tmp_path)
    rows = wait_for(
        lambda: (
            [r for r in world.db.session_rows(world.device_id)[before:] if r.ended_at]
            if len(world.db.session_rows(world.device_id)) - before >= 3
            else None
        ),
        10,
        "three ended scp/sftp sessions",
    )
    assert [(r.path, r.relay_node) for r in rows] == [("peering", "relay-a")] * 3


def _node_store(world: World, tmp_path: Path) -> KeyStore:
    """The fleet's host CA (as a relay node holds it) in a scratch key directory."""
    data = tmp_path / "node-keys"
    keys = data / "keys"
    keys.mkdir(parents=True, mode=0o700)
    data.chmod(0o700)
    for name in ("host_ca", "host_ca.pub", "user_ca", "user_ca.pub"):
        src = world.fleet.hub.data_dir / "keys" / name
        (keys / name).write_bytes(src.read_bytes())
        (keys / name).chmod(0o600)
    return KeyStore.load_or_create(data, ["scratch"])


async def _login(address: str, username: str, key: object) -> asyncssh.SSHClientConnection:
    host, port = split_address(address)
    return await asyncssh.connect(
        host, port, username=username, client_keys=[key], known_hosts=None,
        agent_path=None, config=None, preferred_auth="publickey",
    )  # fmt: skip


def test_peering_login_without_a_node_certificate_is_refused_and_audited(
    world: World, tmp_path: Path
) -> None:
    """An uncertified key, a user-CA certificate, a host-CA certificate for a name that is no
    node, and one whose principal is not the node logging in: each is refused and audited."""
    address = world.db.peer_address("relay-b")
    store = _node_store(world, tmp_path)
    plain = new_key()
    user_ca_key, user_ca_cert = store.user_certificate(
        session_id="x", username="mallory", principal="relay-a"
    )
    intruder = store.node_identity("intruder")
    before = len(world.db.actions("peering.refused_login"))
    attempts = [
        ("relay-a", plain, "key is not certified by the relay host CA"),
        ("relay-a", (user_ca_key, user_ca_cert), "certificate is not from the relay host CA"),
        ("intruder", (intruder.key, intruder.client_cert), "not a registered relay node"),
        (
            "relay-a",
            (intruder.key, intruder.client_cert),
            "certificate principal is not the node name, or it expired",
        ),
    ]
    for username, key, _why in attempts:
        with pytest.raises(asyncssh.PermissionDenied):
            asyncio.run(_login(address, username, key))
    rows = wait_for(
        lambda: (lambda r: r if len(r) >= before + len(attempts) else None)(
            world.db.audit_details("peering.refused_login")
        ),
        5,
        "each refused login audited",
    )[before:]
    expected = [(f"node:{user}", f"user={user}: {why}") for user, _key, why in attempts]
    assert sorted(rows) == sorted(expected)  # written by concurrent transactions


def test_a_peer_asking_for_anything_but_a_device_channel_is_refused_and_audited(
    world: World, tmp_path: Path
) -> None:
    """With a valid node certificate, a session, exec, another host, an unknown device and a
    remote forward are each refused and audited with the peer node's name."""
    address = world.db.peer_address("relay-b")
    node = _node_store(world, tmp_path).node_identity("relay-a")
    before = len(world.db.actions("peering.refused_request"))

    async def run() -> None:
        async with await _login(address, "relay-a", (node.key, node.client_cert)) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.create_session(asyncssh.SSHClientSession)
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run("id", check=False)
            for host, port in (("127.0.0.1", 22), ("device:zzzzzzzzzz", 0), ("device:../x", 0)):
                with pytest.raises(asyncssh.ChannelOpenError):
                    await conn.open_connection(host, port)
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("", 0, "127.0.0.1", 22)
            _reader, writer = await conn.open_connection(f"device:{world.device_id}", 0)
            writer.close()  # the one grant: a channel to a device on this node

    asyncio.run(run())
    rows = wait_for(
        lambda: (lambda r: r[before:] if len(r) >= before + 6 else None)(
            world.db.audit_details("peering.refused_request")
        ),
        5,
        "six refused requests audited",
    )
    assert {actor for actor, _ in rows} == {"node:relay-a"}
    details = sorted(detail for _, detail in rows)  # written by concurrent transactions
    assert details == [
        "device channel to malformed id '../x'",
        "device channel to zzzzzzzzzz: its tunnel is not on this node",
        "direct-tcpip to '127.0.0.1' port 22",
        "remote forward '' port 0",
        "session channel",
        "session channel",
    ], details


def test_unauthenticated_peering_connections_are_capped_per_source(
    world: World, tmp_path: Path
) -> None:
    """Silent connections from one source beyond relay.max_unauthenticated_per_source (16)
    are dropped at once; the held ones see the SSH banner, and a node logs in afterwards."""
    host, port = split_address(world.db.peer_address("relay-b"))
    held = []
    try:
        for _ in range(16):
            sock = socket.create_connection((host, port), timeout=5, source_address=SOURCE)
            assert sock.recv(64).startswith(b"SSH-2.0-")  # accepted and counted
            held.append(sock)
        extra = socket.create_connection((host, port), timeout=5, source_address=SOURCE)
        with extra, contextlib.suppress(ConnectionResetError):
            assert extra.recv(64) == b""  # dropped before any SSH byte
    finally:
        for sock in held:
            sock.close()
    node = _node_store(world, tmp_path).node_identity("relay-a")

    async def login() -> None:
        async with await _login(f"{host}:{port}", "relay-a", (node.key, node.client_cert)):
            pass

    wait_for(lambda: _succeeds(login), 5, "a node login after the held connections closed")


def _succeeds(login: Callable[[], Coroutine[Any, Any, None]]) -> bool:
    try:
        asyncio.run(login())
    except (OSError, asyncssh.Error):
        return False
    return True


def test_the_client_refuses_a_peer_whose_certificate_names_another_node(
    world: World, tmp_path: Path
) -> None:
    """A dialing relay-b's address while meaning relay-c is refused: the host certificate's
    principal must be the node A meant to reach."""
    store = _node_store(world, tmp_path)
    address = world.db.peer_address("relay-b")

    async def lookup(_node: str) -> str:
        return address

    def pool() -> PeerPool:
        return PeerPool(
            node_name="relay-a", identity=store.node_identity("relay-a"), host_ca=store.host_ca,
            lookup=lookup, keepalive_interval=0, keepalive_count=1,
        )  # fmt: skip

    async def run() -> None:
        wrong = pool()
        with pytest.raises(PeerUnavailable, match="relay relay-c cannot be reached"):
            await wrong.connection("relay-c")
        right = pool()
        conn = await right.connection("relay-b")
        assert await right.connection("relay-b") is conn  # pooled, reused
        right.close()

    asyncio.run(run())


def test_kill_9_of_the_peer_ends_the_session_on_a_with_a_message(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """kill -9 of relay-b mid-session: the technician on relay-a is told within 5 s (runs last:
    relay-b stays down)."""
    tech = world.menu(technician_factory)
    tech.sendline(f"connect {world.device_id}")
    tech.sendline("echo alive-$((4*4))")
    tech.expect("alive-16")
    assert world.b.process is not None
    killed = time.monotonic()
    os.killpg(world.b.process.pid, signal.SIGKILL)
    tech.expect(
        rf"Connection to {world.device_id} \(peer-plain\) closed: connection to the device lost\.",
        timeout=5,
    )
    assert time.monotonic() - killed < 5
    tech.expect(PROMPT)
