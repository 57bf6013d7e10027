"""The byte pump of a jump session: raw bytes both ways, no text decoding in the path.

Why not relay.session.bridge.Pump: that one serves the menu's UTF-8 text channel, and
an incremental UTF-8 decoder holds back a chunk's trailing bytes when they look
like the start of a multi-byte character. For sftp/scp packets those bytes
are the end of a message the other side is waiting for, so the transfer
stalls. Jump channels carry bytes (asyncssh `encoding=None`) end to end; only
the optional recording sees decoded text.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import Callable

import asyncssh

from relay.session.bridge import CHUNK, Traffic


class BytesPump:
    """Copies bytes between the technician's nested process and the device's process."""

    def __init__(
        self,
        tech: asyncssh.SSHServerProcess[bytes],
        device: asyncssh.SSHClientProcess[bytes],
        traffic: Traffic,
        on_output: Callable[[str], None] | None = None,
        on_resize: Callable[[int, int], None] | None = None,
        on_input: Callable[[bytes], None] | None = None,
    ) -> None:
        self.tech = tech
        self.device = device
        self.traffic = traffic
        self.on_output = on_output
        self.on_resize = on_resize
        self.on_input = on_input
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    async def run(self) -> None:
        """Until the device side ends; technician EOF is passed on as EOF."""
        up = asyncio.create_task(self._up())
        try:
            await asyncio.gather(
                self._down(self.device.stdout, self.tech.stdout),
                self._down(self.device.stderr, self.tech.stderr),
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
            self.traffic.up += len(data)
            self.traffic.last_activity = loop.time()
            if self.on_input is not None:
                self.on_input(data)
            self.device.stdin.write(data)
            await self.device.stdin.drain()

    async def _down(
        self, reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await reader.read(CHUNK)
            if not data:
                return
            self.traffic.down += len(data)
            self.traffic.last_activity = loop.time()
            if self.on_output is not None:
                self.on_output(self._decoder.decode(data))
            writer.write(data)
            await writer.drain()
