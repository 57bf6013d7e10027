"""The builtin target accepts only fresh user certificates from the relay's CA, for its user.

The real `device_client.target.serve_builtin` runs in this process behind a
stand-in relay (a plain asyncssh server that grants the remote forward with a
real listening socket), so a test can present any certificate to it. The
relay's own certificates come from `core.keys.KeyStore.user_certificate`.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from core.keys import USER_CERT_VALIDITY_MINUTES, KeyStore
from device_client.config import ClientConfig
from device_client.target import current_user, serve_builtin
from device_client.tunnel import Activity

LOGIN = current_user()


class _StandInRelay(asyncssh.SSHServer):
    """Any key logs in; the remote forward binds a real port on 127.0.0.1."""

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return True

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return True


@dataclass
class Builtin:
    port: int  # reaches the builtin target through the device's tunnel
    user_ca: asyncssh.SSHKey
    host_key: asyncssh.SSHKey


@asynccontextmanager
async def builtin_target(
    tmp_path: Path, user_ca: asyncssh.SSHKey | None = None
) -> AsyncIterator[Builtin]:
    """serve_builtin() over a real SSH connection to a stand-in relay; yields its forwarded port."""
    user_ca = user_ca or asyncssh.generate_private_key("ssh-ed25519")
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    host_key_file = tmp_path / "target_host_key"
    host_key.write_private_key(str(host_key_file))
    relay = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_factory=_StandInRelay,
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        config=None,
    )
    device_key = asyncssh.generate_private_key("ssh-ed25519")
    config = ClientConfig(
        tracker_url="http://127.0.0.1:9",
        device_id="dev0000001",
        key_file=tmp_path / "device_key",
        relay_hosts=("127.0.0.1",),
        relay_ports=(relay.get_port(),),
        relay_host_ca=device_key.export_public_key().decode(),
        user_ca=user_ca.export_public_key().decode().strip(),
        state_file=tmp_path / "state.json",
        login_user=LOGIN,
        target="builtin",
        host_key_file=host_key_file,
    )
    conn = await asyncssh.connect(
        "127.0.0.1",
        relay.get_port(),
        username=config.device_id,
        client_keys=[device_key],
        known_hosts=None,
        agent_path=None,
        config=None,
    )
    try:
        server = await serve_builtin(conn, config, Activity())
        try:
            yield Builtin(server.get_port(), user_ca, host_key)
        finally:
            server.close()
    finally:
        conn.close()
        await conn.wait_closed()
        relay.close()
        await relay.wait_closed()


async def _login(
    port: int, host_key: asyncssh.SSHKey, username: str, client_key: Any
) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1",
        port,
        username=username,
        client_keys=[client_key],
        known_hosts=([host_key.convert_to_public()], [], []),
        agent_path=None,
        config=None,
        preferred_auth="publickey",
    )


def _cert(
    ca: asyncssh.SSHKey, principals: list[str], valid_after: str | int, valid_before: str | int
) -> tuple[asyncssh.SSHKey, asyncssh.SSHCertificate]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    cert = ca.generate_user_certificate(
        key,
        "rly:test:alice",
        principals=principals,
        valid_after=valid_after,
        valid_before=valid_before,
        permit_pty=True,
    )
    return key, cert


CertMaker = Callable[[asyncssh.SSHKey], tuple[asyncssh.SSHKey, asyncssh.SSHCertificate]]
REFUSED: dict[str, CertMaker] = {
    "expired": lambda ca: _cert(ca, [LOGIN], int(time.time()) - 1200, int(time.time()) - 600),
    "not yet valid": lambda ca: _cert(ca, [LOGIN], "+10m", "+20m"),
    "wrong principal": lambda ca: _cert(ca, ["nobody-else"], "-1m", "+5m"),
    "wrong CA": lambda _ca: _cert(
        asyncssh.generate_private_key("ssh-ed25519"), [LOGIN], "-1m", "+5m"
    ),
    "no principal": lambda ca: _cert(ca, [], "-1m", "+5m"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_builtin_target_refuses_bad_certificates(tmp_path: Path, case: str) -> None:
    """The builtin target refuses expired, not-yet-valid, wrong-principal and wrong-CA certs."""

    async def scenario() -> None:
        async with builtin_target(tmp_path) as target:
            key, cert = REFUSED[case](target.user_ca)
            with pytest.raises(asyncssh.PermissionDenied):
                await asyncio.wait_for(_login(target.port, target.host_key, LOGIN, (key, cert)), 10)

    asyncio.run(scenario())


def test_builtin_target_refuses_plain_keys_and_other_users(tmp_path: Path) -> None:
    """A bare key, and a valid CA cert for another user name, do not log in."""

    async def scenario() -> None:
        async with builtin_target(tmp_path) as target:
            bare = asyncssh.generate_private_key("ssh-ed25519")
            with pytest.raises(asyncssh.PermissionDenied):
                await _login(target.port, target.host_key, LOGIN, bare)
            other = "nobody" if LOGIN != "nobody" else "daemon"
            key, cert = _cert(target.user_ca, [other], "-1m", "+5m")
            with pytest.raises(asyncssh.PermissionDenied):
                await _login(target.port, target.host_key, other, (key, cert))

    asyncio.run(scenario())


def test_builtin_target_accepts_the_relays_five_minute_certificate(tmp_path: Path) -> None:
    """A certificate exactly as the relay issues it (KeyStore.user_certificate) logs in and runs."""

    async def scenario() -> None:
        store = KeyStore.load_or_create(tmp_path / "data", ["relay.example"])
        async with builtin_target(tmp_path, store.user_ca) as target:
            key, cert = store.user_certificate(session_id="s1", username="alice", principal=LOGIN)
            async with await _login(target.port, target.host_key, LOGIN, (key, cert)) as conn:
                result = await asyncio.wait_for(conn.run("echo builtin-$((6*7))"), 10)
                assert result.stdout == "builtin-42\n"
                assert result.exit_status == 0

    asyncio.run(scenario())


def test_relay_user_certificate_is_short_lived_and_powerless(tmp_path: Path) -> None:
    """Relay certificates: expire ≤ 5 min after issue, one principal, only permit-pty."""
    store = KeyStore.load_or_create(tmp_path / "data", ["relay.example"])
    issued = time.time()
    _key, cert = store.user_certificate(session_id="abc123", username="alice", principal="root")
    path = tmp_path / "cert.pub"
    cert.write_certificate(str(path))
    # read it back with OpenSSH's own parser, not the library that wrote it
    listing = subprocess.run(
        ["ssh-keygen", "-L", "-f", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert re.search(r'Key ID: "rly:abc123:alice"', listing), listing
    principals = re.search(r"Principals:\s*\n((?:\s+\S+\n)+)", listing)
    assert principals is not None and principals.group(1).split() == ["root"], listing
    assert re.search(r"Critical Options: \(none\)", listing), listing
    extensions = re.search(r"Extensions:\s*\n((?:\s+\S+\n?)+)", listing)
    assert extensions is not None and extensions.group(1).split() == ["permit-pty"], listing
    assert "user certificate" in listing
    assert f"Signing CA: ED25519 {store.user_ca.get_fingerprint()}" in listing, listing
    valid = re.search(r"Valid: from (\S+) to (\S+)", listing)
    assert valid is not None, listing
    # ssh-keygen prints local time without a zone; naive datetimes are read as local too
    valid_after, valid_before = (datetime.fromisoformat(t).timestamp() for t in valid.groups())
    assert valid_before - issued <= USER_CERT_VALIDITY_MINUTES * 60 + 2
    assert USER_CERT_VALIDITY_MINUTES <= 5
    assert issued - 90 <= valid_after <= issued, "back-dated by more than a clock-skew minute"
