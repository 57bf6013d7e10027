"""The relay-side SSH server that a ProxyJump channel to a device is served by.

Why a nested server and not a byte pipe to the device: the device trusts only
the relay's user CA, and its login needs a fresh short-lived certificate per
session, which the technician's client cannot hold. So the technician's
`ssh root@DEVICE` (riding the approved `direct-tcpip` channel) is answered by
an asyncssh server running on that channel itself: asyncssh's SSH connection
object is a valid channel session (asyncssh does the same for
`listen(tunnel=...)`), so no socket or port is involved.

Authentication is "none" for the device's login user, and only here: this
transport exists only inside a channel of a connection already approved by a
portal user, bound to one device of that user's account. Each session,
exec or subsystem request then opens the device through its tunnel with a
certificate, exactly as the menu's `connect` does (relay.session.device_session:
session row, audit, host-key pin, byte counts, recording for terminal use).
The server presents the relay host key with a fresh host certificate naming
the device, so `@cert-authority` known_hosts for the relay's host CA verify
it. No forwarding, agent or X11 inside.
"""

from __future__ import annotations

import asyncio
import inspect
import logging

import asyncssh

from core.validate import strip_controls
from relay.context import RelayContext
from relay.session.device_session import DeviceSession, Outcome
from relay.session.recording import Recording
from relay.ssh_options import MAX_PACKET, WINDOW, algorithm_options
from relay.technician.approval_gate import Identity
from relay.technician.device_lookup import DeviceInfo
from relay.technician.jump_pump import BytesPump

log = logging.getLogger(__name__)
HOST_CERT_VALID_AFTER = "-5m"
HOST_CERT_VALID_BEFORE = "+1d"
LOGIN_TIMEOUT = 30.0
SFTP = "sftp"  # the one subsystem passed to devices (scp uses it too since OpenSSH 9.0)


class JumpDeviceSession(DeviceSession[asyncssh.SSHServerProcess[bytes]]):
    """A DeviceSession for one nested channel: bytes end to end, subsystems passed upstream.

    The parent's tunnel wait, session row, certificate, host-key pin, close
    requests and bookkeeping are reused; only the bridge differs (BytesPump).
    """

    async def _bridge(
        self,
        conn: asyncssh.SSHClientConnection,
        session_id: str,
        remote_command: str,
        recording: Recording | None,
    ) -> Outcome:
        tech = self.process
        if tech.subsystem is not None:
            upstream = await conn.create_process(subsystem=tech.subsystem, encoding=None)
        else:
            upstream = await conn.create_process(
                remote_command or None,
                term_type=tech.term_type,
                term_size=tech.term_size,
                term_modes=tech.term_modes,
                encoding=None,
            )
        pump = BytesPump(
            tech,
            upstream,
            self.traffic,
            on_output=recording.output if recording else None,
            on_resize=recording.resize if recording else None,
            on_input=recording.input if recording and recording.records_input else None,
        )
        reason = await self._first_end(pump.run(), session_id, tech.channel.wait_closed())
        if reason == "exit":
            await upstream.wait_closed()
        return _outcome(reason, upstream, conn)

    def _start_recording(self, session_id: str) -> Recording | None:
        """Terminal use is recorded; file transfers (sftp, scp) are not terminal output."""
        command = (self.process.command or "").lstrip()
        if self.process.subsystem is not None or command.startswith("scp "):
            return None
        return super()._start_recording(session_id)


def _outcome(
    reason: str, upstream: asyncssh.SSHClientProcess[bytes], conn: asyncssh.SSHClientConnection
) -> Outcome:
    if reason != "exit":
        return Outcome(None, None, reason)
    if upstream.exit_signal is not None:
        return Outcome(None, upstream.exit_signal[0], f"signal {upstream.exit_signal[0]}")
    if upstream.exit_status is None or upstream.exit_status < 0:
        if not conn.is_closed():  # the device closed the channel itself: EOF, close, no status
            return Outcome(0, None, "closed")  # e.g. an older rly-client's builtin sftp server
        return Outcome(None, None, "connection to the device lost")
    return Outcome(upstream.exit_status, None, f"exit {upstream.exit_status}")


class PassThroughProcess(asyncssh.SSHServerProcess[bytes]):
    """An SSHServerProcess that hands the `sftp` subsystem to its handler like any request.

    asyncssh's stream session answers `sftp` with its own SFTP server (or refuses
    it without an sftp_factory); here the device's sftp-server must get the
    bytes. This overrides `session_started` of asyncssh 2.24.1
    (SSHServerStreamSession), using its `_chan`/`_conn`/`_start_process`.
    """

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == SFTP

    def session_started(self) -> None:
        chan = self._chan
        stdin = asyncssh.SSHReader[bytes](self, chan)
        stdout = asyncssh.SSHWriter[bytes](self, chan)
        stderr = asyncssh.SSHWriter[bytes](self, chan, asyncssh.EXTENDED_DATA_STDERR)
        handler = self._start_process(stdin, stdout, stderr)
        if inspect.isawaitable(handler):
            assert self._conn is not None
            self._conn.create_task(handler, stdin.logger)


class NestedServer(asyncssh.SSHServer):
    """The SSH server of one jump channel: the device's login user, no secrets, no forwarding."""

    def __init__(
        self, ctx: RelayContext, identity: Identity, device: DeviceInfo, client_ip: str
    ) -> None:
        self.ctx = ctx
        self.identity = identity
        self.device = device
        self.client_ip = client_ip
        self.open_sessions = 0
        self.conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn

    def begin_auth(self, username: str) -> bool:
        """No authentication for the device's login user (this transport is approved already)."""
        if username == self.device.login_user:
            return False
        if self.conn is not None:
            self.conn.send_auth_banner(
                f"rly: log in to device {self.device.id} as '{self.device.login_user}'.\n"
            )
        log.info("jump login refused device=%s user=%s", self.device.id, username[:64])
        return True  # no method is offered, so the login fails

    def session_requested(self) -> asyncssh.SSHServerSession[bytes] | bool:
        if self.open_sessions >= self.ctx.settings.relay.max_channels_per_connection:
            return False
        self.open_sessions += 1

        async def run(process: asyncssh.SSHServerProcess[bytes]) -> None:
            try:
                await self._serve(process)
            finally:
                self.open_sessions -= 1

        return PassThroughProcess(run, None, 3, False)

    async def _serve(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        pty = process.term_type is not None

        def say(line: str) -> None:
            process.stderr.write((line + ("\r\n" if pty else "\n")).encode())

        session = JumpDeviceSession(
            self.ctx, process, self.identity, self.device, self.client_ip, say
        )
        status: int | str = 1
        try:
            outcome = await session.run(process.command or "")
            if outcome.exit_signal is not None:
                status = outcome.exit_signal
            elif outcome.exit_status is not None:
                status = outcome.exit_status
        except (BrokenPipeError, ConnectionError):
            return  # the technician left mid-write
        except Exception:
            log.exception("jump session failed device=%s", self.device.id)
            say("rly: internal error; the session ends.")
        if isinstance(status, str):
            process.exit_with_signal(status)
        else:
            process.exit(status)


def host_principals(requested: str, device: DeviceInfo) -> list[str]:
    """Every name the technician may have used for the device (OpenSSH checks one of them)."""
    names = [requested, requested.lower(), device.id, device.hostname.lower(), device.serial]
    cleaned = (strip_controls(name).strip()[:253] for name in names)
    return sorted({name for name in cleaned if name})


async def open_nested_server(
    ctx: RelayContext,
    *,
    identity: Identity,
    device: DeviceInfo,
    requested: str,
    client_ip: str,
) -> asyncssh.SSHServerConnection:
    """A fresh, unstarted SSH server connection, to be returned as the channel's session."""
    keys = ctx.keys
    cert = keys.host_ca.generate_host_certificate(
        keys.host_key,
        f"rly-jump:{device.id}",
        principals=host_principals(requested, device),
        valid_after=HOST_CERT_VALID_AFTER,
        valid_before=HOST_CERT_VALID_BEFORE,
    )

    def factory() -> asyncssh.SSHServer:
        return NestedServer(ctx, identity, device, client_ip)

    options = await asyncssh.SSHServerConnectionOptions.construct(
        server_factory=factory,
        server_host_keys=[(keys.host_key, cert)],
        login_timeout=min(LOGIN_TIMEOUT, ctx.settings.relay.login_grace or LOGIN_TIMEOUT),
        keepalive_interval=0,  # the outer connection's keepalive covers this one
        window=WINDOW,
        max_pktsize=MAX_PACKET,
        agent_forwarding=False,
        x11_forwarding=False,
        allow_scp=False,
        encoding=None,  # bytes end to end (relay.technician.jump_pump)
        line_editor=False,
        **algorithm_options(),
    )
    return asyncssh.SSHServerConnection(asyncio.get_running_loop(), options)
