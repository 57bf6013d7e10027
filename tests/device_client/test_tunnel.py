"""Smoke tests of the tunnel and builtin target against a throwaway asyncssh relay."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import asyncssh
import pytest

from device_client.config import ClientConfig
from device_client.tunnel import Tunnel, open_tunnel

LOGIN_USER = pwd.getpwuid(os.getuid()).pw_name


def _line(key: asyncssh.SSHKey) -> str:
    return key.export_public_key().decode().strip()


class _Relay(asyncssh.SSHServer):
    """Accepts the device key and lets asyncssh bind the forward on loopback."""

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return True


@dataclass
class Keys:
    """The CA and key material one test world needs."""

    host_ca: asyncssh.SSHKey
    user_ca: asyncssh.SSHKey
    device: asyncssh.SSHKey
    relay_host: asyncssh.SSHKey

    @classmethod
    def make(cls) -> Keys:
        gen = asyncssh.generate_private_key
        return cls(gen("ssh-ed25519"), gen("ssh-ed25519"), gen("ssh-ed25519"), gen("ssh-ed25519"))


@contextlib.asynccontextmanager
async def relay(keys: Keys, *, signer: asyncssh.SSHKey | None = None) -> AsyncIterator[int]:
    """Start a fake relay on port 0 presenting a host cert; yield its port."""
    cert = (signer or keys.host_ca).generate_host_certificate(
        keys.relay_host, "relay", principals=["127.0.0.1"]
    )
    acceptor = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_factory=_Relay,
        server_host_keys=[(keys.relay_host, cert)],
        authorized_client_keys=asyncssh.import_authorized_keys(_line(keys.device) + "\n"),
    )
    try:
        yield acceptor.get_port()
    finally:
        acceptor.close()
        await acceptor.wait_closed()


def device_config(tmp_path: Path, keys: Keys, relay_port: int, **changes: object) -> ClientConfig:
    """A device config pointing at the fake relay (a closed port is tried first)."""
    host_key = tmp_path / "builtin_host_key"
    host_key.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    config = ClientConfig(
        tracker_url="http://127.0.0.1:9",
        device_id="dev-1",
        key_file=tmp_path / "key",
        relay_hosts=("127.0.0.1",),
        relay_ports=(9, relay_port),
        relay_host_ca=_line(keys.host_ca),
        user_ca=_line(keys.user_ca),
        state_file=tmp_path / "state.json",
        login_user=LOGIN_USER,
        host_key_file=host_key,
    )
    return replace(config, **changes)  # type: ignore[arg-type]


async def technician(
    keys: Keys, port: int, *, principal: str = LOGIN_USER, user: str = LOGIN_USER
) -> asyncssh.SSHClientConnection:
    """Log in to the builtin target through the relay's forward with a user cert."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    cert = keys.user_ca.generate_user_certificate(
        key, "rly:test:alice", principals=[principal], valid_before="+5m"
    )
    return await asyncssh.connect(
        "127.0.0.1",
        port,
        username=user,
        known_hosts=None,
        client_keys=[(key, cert)],
        config=None,
        agent_path=None,
    )


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.read(100))
    await writer.drain()
    writer.close()


def test_sshd_target_forward_reaches_the_target(tmp_path: Path) -> None:
    """A channel arriving on the tunnel reaches the TCP target and is counted while open."""

    async def scenario() -> None:
        keys = Keys.make()
        echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
        echo_port = echo.sockets[0].getsockname()[1]
        async with relay(keys) as port:
            config = device_config(tmp_path, keys, port, target_port=echo_port)
            tunnel = await open_tunnel(config, keys.device)
            assert (tunnel.relay, tunnel.port) == ("127.0.0.1", port)
            reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.remote_port)
            writer.write(b"ping")
            assert await reader.read(100) == b"ping"
            assert tunnel.activity.open == 1
            writer.close()
            await until(lambda: tunnel.activity.open == 0)
            await tunnel.close()
        echo.close()

    asyncio.run(scenario())


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition that has no event to wait on (state in another object)."""
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("condition not met in time")


def test_relay_not_signed_by_pinned_ca_is_refused(tmp_path: Path) -> None:
    """The device refuses a relay whose host certificate is not from the pinned CA."""

    async def scenario() -> None:
        keys = Keys.make()
        async with relay(keys, signer=asyncssh.generate_private_key("ssh-ed25519")) as port:
            with pytest.raises(OSError, match=rf":{port} relay disconnected: Host CA key is not"):
                await open_tunnel(device_config(tmp_path, keys, port), keys.device)

    asyncio.run(scenario())


@contextlib.asynccontextmanager
async def builtin_tunnel(tmp_path: Path, keys: Keys) -> AsyncIterator[Tunnel]:
    """A tunnel to the fake relay serving the builtin target."""
    async with relay(keys) as port:
        tunnel = await open_tunnel(
            device_config(tmp_path, keys, port, target="builtin"), keys.device
        )
        try:
            yield tunnel
        finally:
            await tunnel.close()


def test_builtin_pty_shell_reports_size_output_and_exit_status(tmp_path: Path) -> None:
    """The builtin target runs the command on a pty of the requested size and returns its status."""

    async def scenario() -> None:
        keys = Keys.make()
        async with builtin_tunnel(tmp_path, keys) as tunnel:
            conn = await technician(keys, tunnel.remote_port)
            result = await conn.run(
                "stty size; tty; exit 3", term_type="xterm", term_size=(100, 40), encoding=None
            )
            out = result.stdout.decode() if isinstance(result.stdout, bytes) else ""
            assert "40 100" in out
            assert "/dev/pts/" in out
            assert result.exit_status == 3
            conn.close()

    asyncio.run(scenario())


def test_builtin_forwards_window_changes(tmp_path: Path) -> None:
    """A window change resizes the pty and the shell gets SIGWINCH."""

    async def scenario() -> None:
        keys = Keys.make()
        async with builtin_tunnel(tmp_path, keys) as tunnel:
            conn = await technician(keys, tunnel.remote_port)
            proc = await conn.create_process(
                "trap 'stty size; exit 0' WINCH; echo ready; while :; do sleep 0.05; done",
                term_type="xterm",
                term_size=(80, 24),
            )
            assert "ready" in await proc.stdout.readline()
            proc.change_terminal_size(120, 50)
            assert "50 120" in await asyncio.wait_for(proc.stdout.readline(), 5)
            result = await asyncio.wait_for(proc.wait(check=False), 5)
            assert result.exit_status == 0
            conn.close()

    asyncio.run(scenario())


def test_builtin_forwards_signals_and_reports_exit_signal(tmp_path: Path) -> None:
    """An SSH INT signal reaches the foreground job, whose death by signal is reported."""

    async def scenario() -> None:
        keys = Keys.make()
        async with builtin_tunnel(tmp_path, keys) as tunnel:
            conn = await technician(keys, tunnel.remote_port)
            proc = await conn.create_process("echo ready; exec sleep 30", term_type="xterm")
            assert "ready" in await proc.stdout.readline()
            proc.send_signal("INT")
            result = await asyncio.wait_for(proc.wait(check=False), 5)
            assert result.exit_signal is not None
            assert result.exit_signal[0] == "INT"
            conn.close()

    asyncio.run(scenario())


def test_builtin_exec_without_pty_keeps_stdout_and_stderr_apart(tmp_path: Path) -> None:
    """A command without a pty gets its stdin, and stdout/stderr arrive separately."""

    async def scenario() -> None:
        keys = Keys.make()
        async with builtin_tunnel(tmp_path, keys) as tunnel:
            conn = await technician(keys, tunnel.remote_port)
            result = await conn.run("cat; echo oops >&2; exit 5", input="data\n")
            assert result.stdout == "data\n"
            assert result.stderr == "oops\n"
            assert result.exit_status == 5
            conn.close()

    asyncio.run(scenario())


def test_builtin_serves_sftp(tmp_path: Path) -> None:
    """sftp (and so OpenSSH scp) works through the builtin target."""

    async def scenario() -> None:
        keys = Keys.make()
        (tmp_path / "hello.txt").write_text("hi")
        async with builtin_tunnel(tmp_path, keys) as tunnel:
            conn = await technician(keys, tunnel.remote_port)
            async with conn.start_sftp_client() as sftp:
                assert (await sftp.listdir(str(tmp_path))).count("hello.txt") == 1
                assert (await sftp.stat(str(tmp_path / "hello.txt"))).size == 2
            conn.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("principal", "user"), [("someone-else", LOGIN_USER), (LOGIN_USER, "nobody")]
)
def test_builtin_refuses_wrong_principal_or_user(tmp_path: Path, principal: str, user: str) -> None:
    """Only a certificate with the login principal, used for the login user, gets in."""

    async def scenario() -> None:
        keys = Keys.make()
        async with builtin_tunnel(tmp_path, keys) as tunnel:
            with pytest.raises(asyncssh.PermissionDenied):
                await technician(keys, tunnel.remote_port, principal=principal, user=user)

    asyncio.run(scenario())
