"""A TCP proxy for fault tests that can stop forwarding on command (a blackholed network).

    with TcpProxy(target_port=relay.device_port) as proxy:   # own event loop thread
        ...point a device at proxy.port...
        proxy.blackhole()    # bytes are dropped both ways; no FIN or RST reaches anyone

While blackholed the proxy keeps every socket open and swallows what arrives,
and it accepts new connections without ever dialling the target, so neither
side learns anything from the network: only keepalives can tell. `LoopThread`
(an asyncio loop on a daemon thread) is shared with `tests.adversarial.hostile`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

T = TypeVar("T")


class LoopThread:
    """An asyncio event loop on its own daemon thread, for servers used by synchronous tests."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # cancel what is left so nothing complains about pending tasks
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run `coro` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Stop the loop (cancelling its tasks) and join the thread."""
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class TcpProxy:
    """127.0.0.1:port -> 127.0.0.1:target_port, with a blackhole switch."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.blackholed = False
        self.connections = 0  # accepted client connections, blackholed or not
        self.forwarded = 0  # bytes passed on, both directions
        self._thread = LoopThread(f"tcp-proxy-{target_port}")
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    def start(self) -> Self:
        self._server = self._thread.call(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

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

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()

    def close(self) -> None:
        """Close the listener and every connection, and stop the loop thread."""
        with contextlib.suppress(Exception):
            self._thread.call(self._close(), timeout=5)
        self._thread.stop()

    def __enter__(self) -> Self:
        return self if self._server is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
