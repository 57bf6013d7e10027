"""The relay's SSH client to a device target, through its tunnel, and the byte bridge.

The technician's channel is a UTF-8 text channel for the menu (its line
editor needs str). While a device session runs, the bridge switches that
channel to bytes (`set_encoding(None)`, as asyncssh itself does for sftp)
and switches it back afterwards, so device bytes pass through unchanged
with no decode/encode per chunk.

The bridge is callback driven, with no task and no await per chunk: the
device's output arrives in `_DeviceSide.data_received` and is written to the
technician's channel at once; the technician's input arrives through a writer
installed on its process (`set_writer`, the hook asyncssh's own process
redirection uses), which also receives window changes, breaks and signals.
Flow control is by pause/resume reading: when the technician's channel has
more than its high-water mark queued, reading from the device channel stops
(its window then stops the device), and the other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import asyncssh

from relay.ssh_options import algorithm_options

log = logging.getLogger(__name__)
CHUNK = 32768  # read size of relay.technician.jump_pump
ENCODING = "utf-8"
ERRORS = "surrogateescape"
STDOUT = 0


class HostKeyMismatch(Exception):
    """The device target presented a host key other than the pinned one."""


@dataclass
class Traffic:
    """Bytes each way, read by the session's housekeeping while the pump runs."""

    up: int = 0
    down: int = 0
    last_activity: float = 0.0


class Carrier(Protocol):
    """What the target's SSH connection rides: a DeviceTunnel or a data connection."""

    async def create_connection(
        self, session_factory: Callable[[], Any], remote_host: str, remote_port: int
    ) -> tuple[Any, Any]: ...


async def connect_target(
    tunnel: Carrier,
    *,
    login_user: str,
    key: asyncssh.SSHKey,
    cert: asyncssh.SSHCertificate,
    pinned_host_key: str | None,
    timeout: float,
) -> asyncssh.SSHClientConnection:
    """SSH to the device's target over `tunnel`; HostKeyMismatch if the pin does not hold."""
    known_hosts: Any = None
    if pinned_host_key:
        known_hosts = ([asyncssh.import_public_key(pinned_host_key)], [], [])
    try:
        return await asyncio.wait_for(
            asyncssh.connect(
                tunnel=tunnel,
                host="device",
                port=22,
                username=login_user,
                client_keys=[(key, cert)],
                known_hosts=known_hosts,
                agent_path=None,
                agent_forwarding=False,
                x11_forwarding=False,
                preferred_auth="publickey",
                config=None,
                **algorithm_options(),
            ),
            timeout,
        )
    except asyncssh.HostKeyNotVerifiable as exc:
        raise HostKeyMismatch(str(exc)) from None


def host_key_line(conn: asyncssh.SSHClientConnection) -> str | None:
    key = conn.get_server_host_key()
    return key.export_public_key().decode().strip() if key is not None else None


def raw_channel(process: asyncssh.SSHServerProcess[str]) -> Any:
    """The channel under asyncssh's line-editor wrapper (or the channel itself)."""
    chan = process.channel
    return getattr(chan, "_orig_chan", chan)


class _TechInput:
    """The technician process's stdin writer (asyncssh `set_writer`): input, EOF, exceptions."""

    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge

    def write(self, data: bytes | str) -> None:
        self._bridge.up(data)

    def write_exception(self, exc: Exception) -> None:
        self._bridge.exception(exc)

    def write_eof(self) -> None:
        self._bridge.up_eof()

    def close(self) -> None:
        pass


class _TechOutput:
    """Registered as a reader of the technician process so its pause/resume_writing reach us."""

    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge

    def pause_reading(self) -> None:
        self._bridge.pause_down(True)

    def resume_reading(self) -> None:
        self._bridge.pause_down(False)

    def close(self) -> None:
        pass


class _DeviceSide(asyncssh.SSHClientSession[bytes]):
    """The device's session channel (bytes); everything it gets goes to the bridge."""

    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self._bridge.device_chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._bridge.down(data, datatype)

    def eof_received(self) -> bool:
        return True  # keep our side open, as asyncssh's SSHClientProcess does

    def exit_status_received(self, status: int) -> None:
        self._bridge.exit_status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self._bridge.exit_signal = signal

    def pause_writing(self) -> None:
        self._bridge.pause_up(True)

    def resume_writing(self) -> None:
        self._bridge.pause_up(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._bridge.device_closed()


class Bridge:
    """Passes bytes between the technician's process and a session on the device's target."""

    def __init__(
        self,
        tech: asyncssh.SSHServerProcess[str],
        traffic: Traffic,
        on_output: Callable[[bytes, int], None] | None = None,
        on_resize: Callable[[int, int], None] | None = None,
        on_input: Callable[[bytes], None] | None = None,
    ) -> None:
        self.tech = tech
        self.traffic = traffic
        self.on_output = on_output
        self.on_resize = on_resize
        self.on_input = on_input  # the recording, when it records what the technician types
        self.device_chan: asyncssh.SSHClientChannel[bytes] | None = None
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self._raw = raw_channel(tech)
        self._loop = asyncio.get_running_loop()
        self._closed = self._loop.create_future()
        self._attached = False
        self._early: list[tuple[bytes, asyncssh.DataType]] = []
        self._up_paused = False
        self._down_paused = False

    async def start(self, conn: asyncssh.SSHClientConnection, command: str | None) -> None:
        """Open the device's session (with the technician's PTY, if any) and attach to it."""
        tech = self.tech
        await conn.create_session(
            lambda: _DeviceSide(self),
            command or None,
            term_type=tech.term_type,
            term_size=tech.term_size,
            term_modes=tech.term_modes,
            encoding=None,
        )
        self._attach()

    def _attach(self) -> None:
        """Switch the technician's channel to bytes and take over its input (synchronous)."""
        self._raw.set_encoding(None)
        self._attached = True
        tech: Any = self.tech
        tech.set_reader(_TechOutput(self), False, None)
        early, self._early = self._early, []
        for data, datatype in early:
            self.down(data, datatype)
        writer = _TechInput(self)
        tech.set_writer(writer, True, None)
        tech.feed_recv_buf(None, writer)  # typed-ahead input, as redirect() does

    def detach(self) -> None:
        """Give the technician's channel back to the menu: text again, input to its reader."""
        if not self._attached:
            return
        self._attached = False
        tech: Any = self.tech
        with contextlib.suppress(KeyError):  # already gone if the technician's channel closed
            tech.clear_writer(None)
        with contextlib.suppress(KeyError):
            tech.clear_reader(None)
        if not self._raw.is_closing():
            self._raw.set_encoding(ENCODING, ERRORS)
        if self._down_paused and self.device_chan is not None:
            self._down_paused = False
            self.device_chan.resume_reading()

    async def wait(self) -> None:
        """Until the device's channel has closed."""
        await asyncio.shield(self._closed)

    # -- device -> technician ------------------------------------------------

    def down(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if not self._attached:
            self._early.append((data, datatype))
            return
        traffic = self.traffic
        traffic.down += len(data)
        traffic.last_activity = self._loop.time()
        if self.on_output is not None:
            self.on_output(data, datatype or STDOUT)
        with contextlib.suppress(OSError):  # the technician left; the session sees it close
            self._raw.write(data, datatype)

    def pause_down(self, paused: bool) -> None:
        """The technician's channel is over (or back under) its write buffer limit."""
        chan = self.device_chan
        if chan is None or paused == self._down_paused:
            return
        self._down_paused = paused
        if paused:
            chan.pause_reading()
        else:
            chan.resume_reading()

    def device_closed(self) -> None:
        if not self._closed.done():
            self._closed.set_result(None)

    # -- technician -> device ------------------------------------------------

    def up(self, data: bytes | str) -> None:
        raw = data.encode(ENCODING, ERRORS) if isinstance(data, str) else data
        traffic = self.traffic
        traffic.up += len(raw)
        traffic.last_activity = self._loop.time()
        if self.on_input is not None:
            self.on_input(raw)
        chan = self.device_chan
        if chan is None:
            return
        with contextlib.suppress(OSError):  # the device's channel is closing: device_closed()
            chan.write(raw)

    def up_eof(self) -> None:
        chan = self.device_chan
        if chan is not None:
            with contextlib.suppress(OSError):
                chan.write_eof()

    def exception(self, exc: Exception) -> None:
        """Window change, break or signal from the technician, passed upstream."""
        chan = self.device_chan
        if chan is None:
            return
        try:
            if isinstance(exc, asyncssh.TerminalSizeChanged):
                chan.change_terminal_size(exc.width, exc.height, exc.pixwidth, exc.pixheight)
                if self.on_resize is not None:
                    self.on_resize(exc.width, exc.height)
            elif isinstance(exc, asyncssh.BreakReceived):
                chan.send_break(exc.msec)
            elif isinstance(exc, asyncssh.SignalReceived):
                chan.send_signal(exc.signal)
        except OSError:
            pass

    def pause_up(self, paused: bool) -> None:
        """The device's channel is over (or back under) its write buffer limit."""
        if paused == self._up_paused or not self._attached:
            return
        self._up_paused = paused
        tech: Any = self.tech
        if paused:
            tech.pause_feeding(None)
        else:
            with contextlib.suppress(KeyError):  # clear_writer() may have resumed it already
                tech.resume_feeding(None)
