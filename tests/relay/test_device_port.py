"""The relay's device port end to end: a real `rly serve` process, devices as real SSH clients."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from tests.relay.device_port_support import (
    Db,
    await_until,
    connect_device,
    database,
    host_ca_public,
    login_refused,
    new_key,
    wait_until,
    write_key,
)
from tests.support.procs import ManagedProcess
from tests.support.rly_server import RlyFactory, RlyServer


@pytest.fixture
def relay(rly_factory: RlyFactory) -> RlyServer:
    return rly_factory()


@pytest.fixture
def db(relay: RlyServer) -> Iterator[Db]:
    with database(relay.data_dir) as handle:
        yield handle


async def _forwarding_device(
    relay: RlyServer, device_id: str, key: asyncssh.SSHKey
) -> tuple[asyncssh.SSHClientConnection, asyncssh.SSHListener]:
    conn = await connect_device(relay.device_port, device_id, key, host_ca_public(relay.data_dir))
    listener = await conn.forward_remote_port("", 0, "127.0.0.1", 9)
    return conn, listener


def test_accepted_device_gets_its_forward_and_a_tunnel_row(relay: RlyServer, db: Db) -> None:
    """An accepted device gets its port-0 forward (synthetic port 1), recorded as an open tunnel."""
    key = new_key()
    device_id = db.add_device(db.add_account(), key)

    async def scenario() -> None:
        conn, listener = await _forwarding_device(relay, device_id, key)
        try:
            assert listener.get_port() == 1
            rows = await await_until(lambda: db.open_tunnels(device_id))
            row = rows[0]
            assert (row.listen_port, row.peer_ip, row.transport_port) == (
                1,
                "127.0.0.1",
                relay.device_port,
            )
            assert row.client_version.startswith("SSH-2.0-AsyncSSH")
            assert db.audits("tunnel.up", device_id)
        finally:
            conn.close()
            await conn.wait_closed()

    asyncio.run(scenario())
    rows = wait_until(lambda: [t for t in db.tunnels(device_id) if t.closed_at is not None])
    assert rows[0].close_reason and rows[0].close_reason.startswith("device disconnected")
    assert wait_until(lambda: db.audits("tunnel.down", device_id))


def test_openssh_client_works_as_a_device(relay: RlyServer, db: Db, tmp_path: Path) -> None:
    """Plain OpenSSH `ssh -N -R 0:localhost:PORT`, trusting the host CA, holds a tunnel."""
    key = new_key()
    device_id = db.add_device(db.add_account(), key)
    key_path = write_key(key, tmp_path / "device_key")
    known = tmp_path / "known_hosts"
    known.write_text(f"@cert-authority * {host_ca_public(relay.data_dir)}\n")
    argv = [
        "ssh", "-N", "-R", "0:localhost:22", "-p", str(relay.device_port), "-i", str(key_path),
        "-o", f"UserKnownHostsFile={known}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", "ExitOnForwardFailure=yes", "-F", "/dev/null", f"{device_id}@127.0.0.1",
    ]  # fmt: skip
    with ManagedProcess(argv, workdir=tmp_path, name="ssh-device") as ssh:
        rows = wait_until(lambda: db.open_tunnels(device_id), timeout=10)
        assert rows[0].client_version.startswith("SSH-2.0-OpenSSH")
        ssh.wait_for_line("Allocated port 1 for remote forward", timeout=5, stream="stderr")
        assert ssh.running
    wait_until(lambda: not db.open_tunnels(device_id))


def test_pending_device_is_refused_and_audited(relay: RlyServer, db: Db) -> None:
    """A device that proves its key but is still pending gets no connection, and this is audited."""
    key = new_key()
    device_id = db.add_device(db.add_account(), key, status="pending")
    ca = host_ca_public(relay.data_dir)
    assert asyncio.run(login_refused(relay.device_port, device_id, key, ca))
    assert wait_until(lambda: db.audits("device.refused", device_id)) == ["pending"]
    assert db.tunnels(device_id) == []


def test_revoked_device_is_refused_and_audited(relay: RlyServer, db: Db) -> None:
    """A revoked device's key no longer opens a tunnel, and the refusal is audited."""
    key = new_key()
    device_id = db.add_device(db.add_account(), key, status="revoked")
    ca = host_ca_public(relay.data_dir)
    assert asyncio.run(login_refused(relay.device_port, device_id, key, ca))
    assert wait_until(lambda: db.audits("device.refused", device_id)) == ["revoked"]


def test_key_of_another_device_is_refused(relay: RlyServer, db: Db) -> None:
    """Device A's key presented as device B is refused (the key blob must be B's own)."""
    account = db.add_account()
    key_a, key_b = new_key(), new_key()
    db.add_device(account, key_a)
    device_b = db.add_device(account, key_b)
    ca = host_ca_public(relay.data_dir)
    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(connect_device(relay.device_port, device_b, key_a, ca))
    assert wait_until(lambda: db.audits("device.refused", device_b)) == ["key mismatch"]


def test_unknown_and_malformed_device_ids_are_refused(relay: RlyServer, db: Db) -> None:
    """A login name that is not an existing device id gets no further than auth."""
    key = new_key()
    ca = host_ca_public(relay.data_dir)
    for name in ("abcdefghjk", "root", "../etc/passwd"):
        with pytest.raises(asyncssh.PermissionDenied):
            asyncio.run(connect_device(relay.device_port, name, key, ca))


def test_revoke_while_connected_drops_the_tunnel_within_a_second(relay: RlyServer, db: Db) -> None:
    """`rly device revoke` in another process disconnects the live tunnel within 1 s."""
    key = new_key()
    device_id = db.add_device(db.add_account(), key)

    async def scenario() -> float:
        conn, _ = await _forwarding_device(relay, device_id, key)
        try:
            await await_until(lambda: db.open_tunnels(device_id))
            result = await asyncio.to_thread(relay.run_cli, "device", "revoke", device_id)
            assert result.returncode == 0, result.stderr
            revoked_at = time.monotonic()
            await asyncio.wait_for(conn.wait_closed(), 5)
            return time.monotonic() - revoked_at
        finally:
            conn.close()

    assert asyncio.run(scenario()) < 1.0
    rows = wait_until(lambda: [t for t in db.tunnels(device_id) if t.closed_at is not None])
    assert rows[0].close_reason == "device revoked"
    assert wait_until(lambda: db.audits("tunnel.down", device_id)) == ["device revoked"]


def test_device_may_not_open_sessions_or_connections(relay: RlyServer, db: Db) -> None:
    """Shell, exec, direct-tcpip and a second forward are refused and each is audited."""
    key = new_key()
    device_id = db.add_device(db.add_account(), key)

    async def scenario() -> None:
        conn, _ = await _forwarding_device(relay, device_id, key)
        try:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.create_session(asyncssh.SSHClientSession)
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.create_session(asyncssh.SSHClientSession, "id")
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("127.0.0.1", relay.http_port)
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("", 2222, "127.0.0.1", 22)
        finally:
            conn.close()

    asyncio.run(scenario())
    details = wait_until(lambda: (d := db.audits("device.refused_request", device_id))[3:] and d)
    assert details[:3] == ["session", "session", f"direct-tcpip 127.0.0.1:{relay.http_port}"]
    assert details[3] == "second forward :2222"


def test_device_outside_the_allowlist_is_refused(relay: RlyServer, db: Db) -> None:
    """With an account allowlist that does not cover the device's address, its login is refused."""
    key = new_key()
    account = db.add_account()
    device_id = db.add_device(account, key)
    db.allow(account, "10.0.0.0/8")
    ca = host_ca_public(relay.data_dir)
    assert asyncio.run(login_refused(relay.device_port, device_id, key, ca))
    assert wait_until(lambda: db.audits("device.refused", device_id)) == ["address not allowed"]


def test_removing_an_allowlist_entry_drops_live_tunnels(relay: RlyServer, db: Db) -> None:
    """Removing the entry that covers a live tunnel's address drops that tunnel within 1 s."""
    key = new_key()
    account = db.add_account()
    device_id = db.add_device(account, key)
    db.allow(account, "127.0.0.0/8")
    db.allow(account, "10.0.0.0/8")

    async def scenario() -> float:
        conn, _ = await _forwarding_device(relay, device_id, key)
        try:
            await await_until(lambda: db.open_tunnels(device_id))
            await asyncio.to_thread(db.disallow, account, "127.0.0.0/8")
            removed_at = time.monotonic()
            await asyncio.wait_for(conn.wait_closed(), 5)
            return time.monotonic() - removed_at
        finally:
            conn.close()

    assert asyncio.run(scenario()) < 1.0
    rows = wait_until(lambda: [t for t in db.tunnels(device_id) if t.closed_at is not None])
    assert rows[0].close_reason == "device address not allowed"


def test_repair_request_drops_the_tunnel_but_not_its_successor(relay: RlyServer, db: Db) -> None:
    """A reconnect request drops the live tunnel at once; the device's new tunnel then stays up."""
    key = new_key()
    device_id = db.add_device(db.add_account(), key)

    async def scenario() -> None:
        conn, _ = await _forwarding_device(relay, device_id, key)
        try:
            await await_until(lambda: db.open_tunnels(device_id))
            await asyncio.to_thread(db.request, device_id, "reconnect")
            await asyncio.wait_for(conn.wait_closed(), 2)
        finally:
            conn.close()
        conn, _ = await _forwarding_device(relay, device_id, key)
        try:
            await await_until(lambda: db.open_tunnels(device_id))
            await asyncio.sleep(1.0)  # several feed rounds: the stale request must not drop it
            assert not conn.is_closed()
        finally:
            conn.close()

    asyncio.run(scenario())
    reasons = [t.close_reason for t in wait_until(lambda: db.tunnels(device_id))]
    assert reasons[0] == "tunnel reconnect requested"
