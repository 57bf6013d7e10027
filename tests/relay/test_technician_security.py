"""Technician port security: forwarding refused, pre-auth limits, penalties, expiry, key logins."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from core.approvals import ApprovalError
from tests.relay.device_port_support import new_key, wait_until, write_key
from tests.relay.test_technician_support import URL_RE, TechDb, approval_token
from tests.support.rly_server import RlyFactory, RlyServer
from tests.support.technician import TechnicianFactory

CONFIG = {
    "relay": {
        "connect_timeout": "2s",
        "approval_ttl": "30s",
        "max_unauthenticated_per_source": 3,
    }
}


@pytest.fixture
def relay(rly_factory: RlyFactory) -> RlyServer:
    return rly_factory(config=CONFIG)


@pytest.fixture
def db(relay: RlyServer) -> Iterator[TechDb]:
    handle = TechDb(relay.data_dir)
    try:
        handle.add_account("acme")
        handle.add_user("alice", "acme")
        handle.add_user("bob", "acme")
        yield handle
    finally:
        handle.close()


async def _gate_login(port: int, password: str = "partner") -> asyncssh.SSHClientConnection:  # noqa: S107
    return await asyncssh.connect(
        "127.0.0.1", port, username="partner", password=password, known_hosts=None,
        agent_path=None, config=None, preferred_auth="password",
    )  # fmt: skip


async def _read_until(stream: asyncssh.SSHReader[str], pattern: str, timeout: float = 5) -> str:
    text = ""
    async with asyncio.timeout(timeout):
        while not re.search(pattern, text):
            chunk = await stream.read(4096)
            assert chunk, f"EOF before {pattern!r}: {text!r}"
            text += chunk
    return text


def test_forwarding_refused_before_and_after_approval(relay: RlyServer, db: TechDb) -> None:
    """-L, -R and streamlocal requests are refused before and after approval, and audited."""

    async def scenario() -> None:
        async with await _gate_login(relay.technician_port) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("127.0.0.1", relay.http_port)
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("", 0, "127.0.0.1", 22)
            process = await conn.create_process(term_type="xterm", term_size=(80, 24))
            text = await _read_until(process.stdout, URL_RE)
            token = re.search(URL_RE, text)
            assert token is not None
            await asyncio.to_thread(db.decide, token.group(2), "alice")
            await _read_until(process.stdout, "rly:alice@acme> ")
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("127.0.0.1", relay.http_port)
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("", 0, "127.0.0.1", 22)
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_unix_connection("/run/sshd.sock")
            process.stdin.write("exit\n")
            await process.wait_closed()

    asyncio.run(scenario())
    refused = [
        e.detail
        for e in wait_until(
            lambda: (
                len(db.actions("technician.refused_request")) >= 5
                and db.actions("technician.refused_request")
            )
        )
    ]
    assert sum("direct-tcpip" in d for d in refused) == 2
    assert sum("tcpip-forward" in d for d in refused) == 2


def test_openssh_dynamic_and_remote_forwards_fail(
    relay: RlyServer, db: TechDb, technician_factory: TechnicianFactory
) -> None:
    """OpenSSH's -R (with ExitOnForwardFailure) and -D/-L channels are refused by the relay."""
    tech = technician_factory(
        relay.technician_port,
        args=["-R", "0:127.0.0.1:22", "-o", "ExitOnForwardFailure=yes"],
    )
    tech.expect("remote port forwarding failed")
    assert tech.expect_eof() == 255
    before = len(db.actions("technician.refused_request"))
    assert before >= 1


def test_expired_approval_disconnects(
    rly_factory: RlyFactory, technician_factory: TechnicianFactory
) -> None:
    """With a 2 s approval lifetime, an undecided session is told so and disconnected."""
    relay = rly_factory(config={"relay": {"approval_ttl": "2s"}})
    tech = technician_factory(relay.technician_port)
    token = approval_token(tech)
    started = time.monotonic()
    tech.expect("expired", timeout=5)
    assert tech.expect_eof(timeout=3) not in (0, None)
    assert time.monotonic() - started < 4
    db = TechDb(relay.data_dir)
    try:
        assert db.approval(token).status == "expired"
    finally:
        db.close()


def test_client_leaving_abandons_the_approval(
    relay: RlyServer, db: TechDb, technician_factory: TechnicianFactory
) -> None:
    """When the SSH client goes away first, the pending approval is marked abandoned."""
    tech = technician_factory(relay.technician_port)
    token = approval_token(tech)
    tech.close()
    wait_until(lambda: db.approval(token).status == "abandoned")
    with pytest.raises(ApprovalError):
        db.decide(token, "alice")


def test_ctrl_c_while_waiting_withdraws(
    relay: RlyServer, db: TechDb, technician_factory: TechnicianFactory
) -> None:
    """Ctrl-C while waiting for approval withdraws the request and disconnects."""
    tech = technician_factory(relay.technician_port)
    token = approval_token(tech)
    tech.expect("Waiting for approval")  # the session is up (the link came with the login)
    tech.sendcontrol("c")
    tech.expect("withdrawn")
    assert tech.expect_eof() not in (0, None)
    assert db.approval(token).status == "abandoned"


def test_user_key_login_only_that_user_may_approve(
    relay: RlyServer, db: TechDb, tmp_path: Path, technician_factory: TechnicianFactory
) -> None:
    """`ssh alice@relay` with alice's registered key: bob cannot approve, alice can."""
    key = new_key()
    db.add_user_key("alice", key)
    tech = technician_factory(
        relay.technician_port,
        user="alice",
        password=None,
        identity_file=write_key(key, tmp_path / "id"),
    )
    token = approval_token(tech)
    with pytest.raises(ApprovalError):
        db.decide(token, "bob")
    db.decide(token, "alice")
    tech.expect(re.escape("rly:alice@acme> "), timeout=3)
    assert any("publickey" in e.detail for e in db.actions("technician.login"))


def test_unregistered_key_and_disabled_gate_are_refused(
    rly_factory: RlyFactory, tmp_path: Path, technician_factory: TechnicianFactory
) -> None:
    """An empty gate password disables the shared login; an unknown key does not log in."""
    relay = rly_factory(config={"relay": {"gate_password": ""}})
    key_path = write_key(new_key(), tmp_path / "id")
    tech = technician_factory(relay.technician_port, password=None, identity_file=key_path)
    tech.expect("Permission denied")
    assert tech.expect_eof() == 255


def test_repeated_wrong_passwords_are_slowed_down(relay: RlyServer, db: TechDb) -> None:
    """A source that keeps failing the gate password waits longer for each failure answer."""

    async def attempt() -> float:
        started = time.monotonic()
        with pytest.raises(asyncssh.PermissionDenied):
            await _gate_login(relay.technician_port, password="wrong")
        return time.monotonic() - started

    async def scenario() -> list[float]:
        return [await attempt() for _ in range(5)]

    times = asyncio.run(scenario())
    assert times[-1] > times[0] + 1.0, times
    failed = db.actions("technician.login_failed")
    assert len(failed) >= 5
    assert all("wrong" not in e.detail for e in failed)


def test_unauthenticated_connections_capped_per_source(relay: RlyServer) -> None:
    """Beyond max_unauthenticated_per_source, a new connection is closed before any banner."""
    socks = []
    try:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", relay.technician_port), timeout=5)
            assert sock.recv(64).startswith(b"SSH-2.0-")
            socks.append(sock)
        extra = socket.create_connection(("127.0.0.1", relay.technician_port), timeout=5)
        socks.append(extra)
        assert extra.recv(64) == b""
    finally:
        for sock in socks:
            sock.close()
    time.sleep(0.2)
    sock = socket.create_connection(("127.0.0.1", relay.technician_port), timeout=5)
    try:
        assert sock.recv(64).startswith(b"SSH-2.0-")  # slots are freed when clients leave
    finally:
        sock.close()


def test_subsystems_are_refused_without_an_approval(relay: RlyServer, db: TechDb) -> None:
    """An sftp subsystem request on the relay itself fails at once and creates no approval."""

    async def scenario() -> None:
        async with await _gate_login(relay.technician_port) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.create_process(subsystem="sftp", encoding=None)

    asyncio.run(scenario())
    assert not db.actions("approval.requested")


def test_kbdint_login_shows_the_approval_link_once(
    relay: RlyServer, db: TechDb, technician_factory: TechnicianFactory
) -> None:
    """OpenSSH prints the link of the keyboard-interactive round; the session only waits."""
    tech = technician_factory(relay.technician_port)  # LogLevel INFO, OpenSSH's default
    token = approval_token(tech)
    tech.expect("Waiting for approval of the link shown at login")
    tech.expect(r"Waiting for approval: \d:\d\d left")  # the countdown
    assert len(re.findall(URL_RE, tech.output)) == 1
    db.decide(token, "alice")
    tech.expect(re.escape("rly:alice@acme> "), timeout=3)
    assert len(re.findall(URL_RE, tech.output)) == 1


def test_quiet_client_gets_the_link_on_enter(
    relay: RlyServer, db: TechDb, technician_factory: TechnicianFactory
) -> None:
    """`ssh -q` hides the keyboard-interactive link: Enter in the session shows it."""
    tech = technician_factory(relay.technician_port, args=["-q"])
    tech.expect("press Enter to show it again")
    assert not re.search(URL_RE, tech.output)
    tech.sendline("")
    token = approval_token(tech)
    db.decide(token, "alice")
    tech.expect(re.escape("rly:alice@acme> "), timeout=3)


def test_client_killed_at_the_menu_prompt_logs_one_info_line(
    relay: RlyServer, db: TechDb, technician_factory: TechnicianFactory
) -> None:
    """ssh killed at the menu prompt: the relay logs the lost connection, no ERROR, no traceback."""
    tech = technician_factory(relay.technician_port)
    db.decide(approval_token(tech), "alice")
    tech.expect(re.escape("rly:alice@acme> "), timeout=3)
    os.kill(tech.child.pid, signal.SIGKILL)
    # the session's end, logged
    wait_until(lambda: "relay.technician.menu: technician" in relay.output)
    time.sleep(0.5)  # anything else the end of the session logs
    lines = relay.output.splitlines()
    assert not [line for line in lines if "Traceback" in line or " ERROR " in line], lines[-20:]
    assert any(" INFO relay.technician.menu: technician " in line for line in lines)


def test_client_that_drops_the_kbdint_text_gets_the_link_in_the_session(
    relay: RlyServer, db: TechDb
) -> None:
    """asyncssh answers the prompt-less kbdint round without showing it: the session prints
    the link (only OpenSSH is trusted to have shown it at login)."""

    async def scenario() -> None:
        async with asyncssh.connect(
            "127.0.0.1", relay.technician_port, username="partner", password="partner",
            known_hosts=None, agent_path=None, config=None, preferred_auth="keyboard-interactive",
        ) as conn:  # fmt: skip
            process = await conn.create_process(term_type="xterm", term_size=(80, 24))
            text = await _read_until(process.stdout, URL_RE)
            assert "This session needs approval" in text
            process.close()

    asyncio.run(scenario())
    assert any("method=keyboard-interactive" in e.detail for e in db.actions("technician.login"))
