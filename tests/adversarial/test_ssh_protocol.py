"""SSH protocol hygiene on both relay ports: algorithm offer, strict kex, early and huge packets."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

import asyncssh
import pytest
from asyncssh.packet import Boolean, String, UInt32

from core.models import Approval, Tunnel
from tests.adversarial.rawssh import (
    MSG_CHANNEL_OPEN,
    MSG_GLOBAL_REQUEST,
    MSG_IGNORE,
    RawSsh,
    client_kexinit,
)
from tests.adversarial.support import Stack

WEAK = ("sha1", "md5", "ssh-dss", "dsa", "cbc", "3des", "arcfour", "rc4", "group1-", "zlib")
PORTS = ["technician", "device"]


def _port(stack: Stack, which: str) -> int:
    return stack.server.technician_port if which == "technician" else stack.server.device_port


@pytest.mark.parametrize("which", PORTS)
def test_offer_is_modern_with_strict_kex(stack: Stack, which: str) -> None:
    """Each port advertises kex-strict-s-v00 (Terrapin) and offers no SHA-1, DSA, CBC or ssh-rsa."""
    raw = RawSsh.connect(_port(stack, which))
    try:
        assert raw.server_version.startswith(b"SSH-2.0-")
        offer = raw.server_kexinit()
    finally:
        raw.close()
    assert "kex-strict-s-v00@openssh.com" in offer["kex"]
    for field, names in offer.items():
        weak = [n for n in names if any(w in n.lower() for w in WEAK)]
        assert not weak, f"{which} port offers {weak} in {field}"
    assert "ssh-rsa" not in offer["host_key"]
    assert set(offer["comp_c2s"]) == {"none"}


@pytest.mark.parametrize("which", PORTS)
def test_strict_kex_refuses_a_stray_packet_during_initial_kex(stack: Stack, which: str) -> None:
    """With strict kex agreed, an IGNORE slipped into the initial key exchange ends the link."""
    raw = RawSsh.connect(_port(stack, which))
    try:
        raw.server_kexinit()
        raw.send_packet(client_kexinit(["curve25519-sha256", "kex-strict-c-v00@openssh.com"]))
        raw.send_packet(bytes([MSG_IGNORE]) + String(b"terrapin"))
        assert raw.closed_within(3.0)
    finally:
        raw.close()


@pytest.mark.parametrize("which", PORTS)
def test_channel_open_before_key_exchange_disconnects(stack: Stack, which: str) -> None:
    """An unencrypted CHANNEL_OPEN before any key exchange is refused with a disconnect."""
    raw = RawSsh.connect(_port(stack, which))
    try:
        payload = bytes([MSG_CHANNEL_OPEN]) + String(b"session") + UInt32(0) * 3
        raw.send_packet(payload)
        assert raw.closed_within(3.0)
    finally:
        raw.close()
    assert stack.approvals() == []


@pytest.mark.parametrize("which", PORTS)
def test_absurd_packet_length_is_dropped_at_once(stack: Stack, which: str) -> None:
    """A packet announcing 4 GB is dropped at once; the relay never waits for or buffers it."""
    raw = RawSsh.connect(_port(stack, which))
    try:
        raw.server_kexinit()
        raw.sock.sendall(struct.pack(">IB", 0xFFFFFFF0, 4) + b"\0" * 64)
        assert raw.closed_within(3.0)
    finally:
        raw.close()


class _EarlyRequester(asyncssh.SSHClient):
    """A client that slips a post-auth packet in just before its first auth attempt."""

    def __init__(self, pkttype: int, args: list[bytes], key: asyncssh.SSHKey | None) -> None:
        self.pkttype, self.args, self.key = pkttype, args, key
        self.conn: Any = None

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn

    def _send_early(self) -> None:
        if self.pkttype == 0:
            return  # the control: nothing early
        # asyncssh defers such packets until auth completes; pretend it did, for one packet.
        self.conn._auth_complete = True
        try:
            self.conn.send_packet(self.pkttype, *self.args)
        finally:
            self.conn._auth_complete = False

    def password_auth_requested(self) -> str:
        self._send_early()
        return "partner"  # the right gate password: only the early packet may stop us

    def public_key_auth_requested(self) -> asyncssh.SSHKey | None:
        self._send_early()
        return self.key


DIRECT_TO = [String(b"127.0.0.1"), UInt32(22), String(b"127.0.0.1"), UInt32(1)]
EARLY: dict[str, tuple[int, list[bytes]]] = {
    "channel open": (
        MSG_CHANNEL_OPEN,
        [String(b"session"), UInt32(0), UInt32(65536), UInt32(32768)],
    ),
    "direct-tcpip": (
        MSG_CHANNEL_OPEN,
        [String(b"direct-tcpip"), UInt32(0), UInt32(65536), UInt32(32768), *DIRECT_TO],
    ),
    "global request": (
        MSG_GLOBAL_REQUEST,
        [String(b"tcpip-forward"), Boolean(True), String(b""), UInt32(0)],
    ),
}


def test_control_same_clients_without_early_request_log_in(stack: Stack) -> None:
    """The clients used above do log in on both ports when they send nothing early."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    device_id = stack.add_device(key)
    port = stack.server.technician_port
    factory = lambda: _EarlyRequester(0, [], key)  # noqa: E731
    assert asyncio.run(_early(port, "partner", factory, preferred_auth="password")) is None
    port = stack.server.device_port
    assert asyncio.run(_early(port, device_id, factory, preferred_auth="publickey")) is None


async def _early(
    port: int, user: str, factory: Callable[[], asyncssh.SSHClient], **kw: Any
) -> Exception | None:
    try:
        conn = await asyncio.wait_for(
            asyncssh.connect(
                "127.0.0.1",
                port,
                username=user,
                client_factory=factory,
                known_hosts=None,
                agent_path=None,
                config=None,
                **kw,
            ),
            10,
        )
    except (asyncssh.Error, OSError) as exc:
        return exc
    conn.close()
    return None


@pytest.mark.parametrize("request_kind", list(EARLY))
def test_requests_before_auth_disconnect_and_run_no_handler(
    stack: Stack, request_kind: str
) -> None:
    """A channel open or global request sent before auth completes ends the connection on both
    ports: no login, no approval, no tunnel, even though the credentials that follow are right."""
    pkttype, args = EARLY[request_kind]
    key = asyncssh.generate_private_key("ssh-ed25519")
    device_id = stack.add_device(key)
    tech = asyncio.run(
        _early(
            stack.server.technician_port,
            "partner",
            lambda: _EarlyRequester(pkttype, args, None),
            preferred_auth="password",
            client_keys=None,
        )
    )
    dev = asyncio.run(
        _early(
            stack.server.device_port,
            device_id,
            lambda: _EarlyRequester(pkttype, args, key),
            preferred_auth="publickey",
            client_keys=None,
        )
    )
    assert tech is not None and dev is not None, "an early request did not end the connection"
    assert stack.audit("technician.login") == []
    assert stack.run(lambda s: s.query(Approval).count()) == 0
    assert stack.run(lambda s: s.query(Tunnel).count()) == 0
