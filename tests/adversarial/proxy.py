"""A TCP proxy for fault tests that can stop forwarding on command (a blackholed network).

    with TcpProxy(target_port=relay.device_port) as proxy:   # own event loop thread
        ...point a device at proxy.port...
        proxy.blackhole()    # bytes are dropped both ways; no FIN or RST reaches anyone

While blackholed the proxy keeps every socket open and swallows what arrives,
and it accepts new connections without ever dialling the target, so neither
side learns anything from the network: only keepalives can tell.
"""

from __future__ import annotations

import asyncio
import contextlib

from tests.adversarial.loop_server import Listener, LoopServer


class TcpProxy(LoopServer):
    """127.0.0.1:port -> 127.0.0.1:target_port, with a blackhole switch."""

    def __init__(self, target_port: int) -> None:
        super().__init__(f"tcp-proxy-{target_port}")
        self.target_port = target_port
        self.blackholed = False
        self.connections = 0  # accepted client connections, blackholed or not
        self.forwarded = 0  # bytes passed on, both directions

    async def _listen(self) -> Listener:
        return await asyncio.start_server(self._serve, "127.0.0.1", 0)

    def blackhole(self) -> None:
        """From now on drop every byte, both ways, on old and new connections; close nothing."""
        self.blackholed = True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        if self.blackholed:
            await self._swallow(reader)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        await asyncio.gather(
            self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
        )

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if self.blackholed:
                    continue
                self.forwarded += len(data)
                writer.write(data)
                await writer.drain()
            if not self.blackholed:  # a real close passes on; a blackhole hides it
                writer.close()
        if self.blackholed:
            await asyncio.Event().wait()  # keep the other side's socket open, silently
