"""The relay's SSH client to a device target, through its tunnel, and the byte pump.

The technician's channel keeps its UTF-8 text encoding (the menu's line
editor needs it) with `surrogateescape` errors, so any byte sequence the
device sends survives the str round trip unchanged. Device output is written
to the underlying channel, not through the line editor, which would rewrite
newlines and track columns per character. Window changes, breaks and signals
arrive on the technician's stdin as exceptions and are passed upstream.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncssh

from relay.ssh_options import algorithm_options
from relay.tunnels import DeviceTunnel

log = logging.getLogger(__name__)
CHUNK = 32768
ENCODING = "utf-8"
ERRORS = "surrogateescape"


class HostKeyMismatch(Exception):
    """The device target presented a host key other than the pinned one."""


@dataclass
class Traffic:
    """Bytes each way, read by the session's housekeeping while the pump runs."""

    up: int = 0
    down: int = 0
    last_activity: float = 0.0


async def connect_target(
    tunnel: DeviceTunnel,
    *,
    login_user: str,
    key: asyncssh.SSHKey,
    cert: asyncssh.SSHCertificate,
    pinned_host_key: str | None,
    timeout: float,
) -> asyncssh.SSHClientConnection:
    """SSH to the device's target over its tunnel; HostKeyMismatch if the pin does not hold."""
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


class Pump:
    """Copies bytes between the technician's process and the device's process."""

    def __init__(
        self,
        tech: asyncssh.SSHServerProcess[str],
        device: asyncssh.SSHClientProcess[bytes],
        traffic: Traffic,
        on_output: Callable[[str], None] | None = None,
        on_resize: Callable[[int, int], None] | None = None,
    ) -> None:
        self.tech = tech
        self.device = device
        self.traffic = traffic
        self.on_output = on_output
        self.on_resize = on_resize
        self._raw = raw_channel(tech)

    async def run(self) -> None:
        """Until the device side ends; technician EOF is passed on as EOF."""
        up = asyncio.create_task(self._up())
        try:
            await asyncio.gather(
                self._down(self.device.stdout, None),
                self._down(self.device.stderr, asyncssh.EXTENDED_DATA_STDERR),
            )
        finally:
            up.cancel()
            await asyncio.gather(up, return_exceptions=True)

    async def _up(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await self.tech.stdin.read(CHUNK)
            except asyncssh.TerminalSizeChanged as exc:
                self.device.change_terminal_size(exc.width, exc.height, exc.pixwidth, exc.pixheight)
                if self.on_resize is not None:
                    self.on_resize(exc.width, exc.height)
                continue
            except asyncssh.BreakReceived as exc:
                self.device.send_break(exc.msec)
                continue
            except asyncssh.SignalReceived as exc:
                self.device.send_signal(exc.signal)
                continue
            if not data:
                self.device.stdin.write_eof()
                return
            raw = data.encode(ENCODING, ERRORS)
            self.traffic.up += len(raw)
            self.traffic.last_activity = loop.time()
            self.device.stdin.write(raw)
            await self.device.stdin.drain()

    async def _down(self, reader: asyncssh.SSHReader[bytes], datatype: int | None) -> None:
        loop = asyncio.get_running_loop()
        decoder = codecs.getincrementaldecoder(ENCODING)(ERRORS)
        while True:
            raw = await reader.read(CHUNK)
            if not raw:
                return
            self.traffic.down += len(raw)
            self.traffic.last_activity = loop.time()
            text = decoder.decode(raw)
            if self.on_output is not None:
                self.on_output(text)
            self._raw.write(text, datatype)
            await self.tech.stdout.drain()
