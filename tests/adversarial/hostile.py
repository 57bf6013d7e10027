"""Hostile device targets: what a compromised or broken appliance could put behind its tunnel.

    with HostileTarget("endless_banner") as target:      # a TCP server on its own loop thread
        ...device tunnel forwards to target.port...
    with FloodTarget(100 * 2**20) as target:             # a real SSH server that floods output
        ...

`HostileTarget` speaks broken SSH in one of `MODES`; it counts connections and
notices when the relay closes them (`open_connections`). `FloodTarget` accepts
any certificate or key and answers every session with `total` bytes as fast as
the channel takes them, counting what it managed to send.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct

import asyncssh

from tests.adversarial.loop_server import Listener, LoopServer

MODES = (
    "endless_banner",
    "gigantic_banner",
    "garbage_after_banner",
    "silence",
    "instant_close",
    "absurd_packet_length",
)
BANNER = b"SSH-2.0-hostile_1.0\r\n"
GIGANTIC = 2 * 1024 * 1024  # one banner line without a newline, > 1 MB


class HostileTarget(LoopServer):
    """A TCP server on 127.0.0.1 that misbehaves as an SSH server in one way."""

    def __init__(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        super().__init__(f"hostile-{mode}")
        self.mode = mode
        self.connections = 0
        self.open_connections = 0
        self.sent = 0

    async def _listen(self) -> Listener:
        return await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_connections += 1
        self._writers.add(writer)
        try:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                await self._misbehave(reader, writer)
                await self._drain_until_closed(reader)
        finally:
            self.open_connections -= 1
            self._writers.discard(writer)
            writer.transport.abort()

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        self.sent += len(data)
        await writer.drain()

    async def _misbehave(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "instant_close":
            writer.transport.abort()
        elif self.mode == "silence":
            pass
        elif self.mode == "endless_banner":
            line = b"Welcome! " + b"=" * 100 + b"\r\n"
            while not reader.at_eof():
                await self._send(writer, line * 64)
                await asyncio.sleep(0)  # let the EOF be seen
        elif self.mode == "gigantic_banner":
            chunk = b"A" * 65536
            for _ in range(GIGANTIC // len(chunk)):
                await self._send(writer, chunk)
        elif self.mode == "garbage_after_banner":
            await self._send(writer, BANNER)
            for _ in range(64):
                await self._send(writer, os.urandom(16384))
        elif self.mode == "absurd_packet_length":
            await self._send(writer, BANNER)
            await reader.readline()  # the relay's version line
            await self._send(writer, struct.pack(">I", 0xFFFFFFF0) + b"\x00" * 64)

    async def _drain_until_closed(self, reader: asyncio.StreamReader) -> None:
        """Read and discard until the relay side closes (it must, eventually)."""
        while await reader.read(65536):
            pass


class _AnyKeyServer(asyncssh.SSHServer):
    """Lets any public key or certificate in (the flood target does not care who it floods)."""

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return True

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return True


class FloodTarget(LoopServer):
    """A real SSH server whose sessions write `total` bytes of output as fast as allowed."""

    def __init__(self, total: int) -> None:
        super().__init__("flood-target")
        self.total = total
        self.sent = 0
        self.sessions = 0

    async def _listen(self) -> Listener:
        return await asyncssh.listen(
            "127.0.0.1",
            0,
            server_factory=_AnyKeyServer,
            server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
            process_factory=self._flood,
            encoding=None,
            config=None,
        )

    async def _flood(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        self.sessions += 1
        chunk = b"x" * 32767 + b"\n"
        with contextlib.suppress(OSError, asyncssh.Error):
            while self.sent < self.total and not process.is_closing():
                process.stdout.write(chunk)
                self.sent += len(chunk)
                await process.stdout.drain()
            process.exit(0)
