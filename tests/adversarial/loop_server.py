"""Servers for synchronous tests that run on their own asyncio loop thread.

`LoopThread` is an event loop on a daemon thread. `LoopServer` is the shared
life cycle of the fault-test servers built on it (the blackhole proxy, the
hostile targets): `start()` binds through the subclass's `_listen()`, the
context manager stops it, and closing aborts every connection the subclass
recorded in `_writers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

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


class Listener(Protocol):
    """What both asyncio.Server and asyncssh.SSHAcceptor offer."""

    @property
    def sockets(self) -> Sequence[socket.socket]: ...

    def close(self) -> None: ...


class LoopServer:
    """A listener on 127.0.0.1 with its own loop thread; a context manager."""

    def __init__(self, thread_name: str) -> None:
        self.port = 0
        self._thread = LoopThread(thread_name)
        self._listener: Listener | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _listen(self) -> Listener:
        raise NotImplementedError

    def start(self) -> Self:
        self._listener = self._thread.call(self._listen())
        self.port = int(self._listener.sockets[0].getsockname()[1])
        return self

    async def _close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for writer in list(self._writers):
            writer.transport.abort()

    def close(self) -> None:
        """Close the listener and every connection, and stop the loop thread."""
        with contextlib.suppress(Exception):
            self._thread.call(self._close(), timeout=5)
        self._thread.stop()

    def __enter__(self) -> Self:
        return self if self._listener is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
