"""In-process wake-ups between the relay, tracker and portal sharing one loop.

Waiters never poll the database themselves: core/feed.py turns changes made by
any process into `notify` calls, so the common single-process case is
immediate and several processes agree within the feed interval.
A subscriber is a plain callback, so an idle device tunnel watching its own
topic costs one set entry, not a task and a timer.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
POLL_INTERVAL = 0.25
Callback = Callable[[], None]
MessageHandler = Callable[[str], None]


class Hub:
    def __init__(self) -> None:
        self._subscribers: dict[str, set[Callback]] = defaultdict(set)
        self._handlers: dict[str, MessageHandler] = {}  # kind -> handler of whole topics
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closing = False

    def close(self) -> None:
        """Shutting down: wake every waiter now and make later waits return at once.

        Long polls then answer normally inside the HTTP server's grace period
        instead of being cancelled mid-request.
        """
        self.closing = True
        with self._lock:
            callbacks = [cb for subscribers in self._subscribers.values() for cb in subscribers]
        for callback in callbacks:
            callback()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def notify(self, topic: str) -> None:
        """Call every subscriber of topic on the loop; safe to call from any thread."""
        with self._lock:
            callbacks = list(self._subscribers.get(topic, ()))
            handler = self._handlers.get(topic.partition(":")[0])
        if handler is not None:
            callbacks.append(lambda: handler(topic))
        loop = self._loop
        for callback in callbacks:
            if loop is None:
                callback()
            else:
                loop.call_soon_threadsafe(callback)

    def handle(self, kind: str, handler: MessageHandler) -> None:
        """Give every topic `kind:...` to handler (on the loop): topics that carry a message,
        such as a dial-back request, rather than name something to re-read."""
        with self._lock:
            self._handlers[kind] = handler

    def subscribe(self, topic: str, callback: Callback) -> Callback:
        """Register callback for topic; return the function that unregisters it."""
        with self._lock:
            self._subscribers[topic].add(callback)

        def unsubscribe() -> None:
            with self._lock:
                subscribers = self._subscribers.get(topic)
                if subscribers is not None:
                    subscribers.discard(callback)
                    if not subscribers:
                        del self._subscribers[topic]

        return unsubscribe

    async def wait(self, topic: str, timeout: float) -> bool:
        """Wait for a notify on topic; True if woken, False on timeout or while closing."""
        if self.closing:
            return False
        event = asyncio.Event()
        unsubscribe = self.subscribe(topic, event.set)
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
            return True
        except TimeoutError:
            return False
        finally:
            unsubscribe()

    def watch(self, topic: str) -> Watch:
        """A subscription kept across several waits: a wake-up between them is not lost."""
        return Watch(self, topic)

    async def wait_until(
        self, topic: str, check: Callable[[], Awaitable[T | None]], timeout: float
    ) -> T | None:
        """Poll `check` until it returns a value, waking early on notify (also one during check)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with self.watch(topic) as watch:
            while True:
                result = await check()
                if result is not None:
                    return result
                left = deadline - loop.time()
                if left <= 0:
                    return None
                await watch.wait(min(POLL_INTERVAL, left))


class Watch:
    """One topic's wake-ups, remembered until the next `wait`.

    `hub.wait` subscribes only while it waits, so a notify that lands while the
    caller re-reads the database (between two waits) is lost and the caller
    sleeps its whole tick. A Watch stays subscribed from creation to `close`.
    """

    def __init__(self, hub: Hub, topic: str) -> None:
        self._hub = hub
        self._woken = asyncio.Event()
        self._unsubscribe = hub.subscribe(topic, self._woken.set)

    async def wait(self, timeout: float) -> bool:
        """True if woken since the previous wait (or now), False on timeout or while closing."""
        if self._hub.closing:
            return False
        try:
            async with asyncio.timeout(timeout):
                await self._woken.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._woken.clear()

    def close(self) -> None:
        self._unsubscribe()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
