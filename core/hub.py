"""In-process wake-ups between the relay, tracker and portal sharing one loop.

A waiter also polls the database (callers pass a check function), so a change
made by another process is seen within the poll interval; the hub only makes
the common single-process case immediate.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

POLL_INTERVAL = 0.25


class Hub:
    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def notify(self, topic: str) -> None:
        """Wake every waiter on topic; safe to call from any thread."""
        with self._lock:
            events = list(self._waiters.get(topic, ()))
        loop = self._loop
        for ev in events:
            if loop is None:
                ev.set()
            else:
                loop.call_soon_threadsafe(ev.set)

    async def wait(self, topic: str, timeout: float) -> bool:
        """Wait for a notify on topic; True if woken, False on timeout."""
        ev = asyncio.Event()
        with self._lock:
            self._waiters[topic].add(ev)
        try:
            await asyncio.wait_for(ev.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            with self._lock:
                self._waiters[topic].discard(ev)
                if not self._waiters[topic]:
                    del self._waiters[topic]

    async def wait_until(
        self, topic: str, check: Callable[[], Awaitable[T | None]], timeout: float
    ) -> T | None:
        """Poll `check` until it returns a value, waking early on notify."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = await check()
            if result is not None:
                return result
            left = deadline - loop.time()
            if left <= 0:
                return None
            await self.wait(topic, min(POLL_INTERVAL, left))
