"""The hub's watch keeps a wake-up that lands between two waits (a waiter reading the database)."""

from __future__ import annotations

import asyncio
import time

from core.hub import Hub


def test_a_notify_between_waits_wakes_the_next_wait_at_once() -> None:
    """Hub.watch remembers a notify made while nobody waited; the next wait returns at once."""

    async def scenario() -> tuple[bool, float, bool]:
        hub = Hub()
        hub.bind(asyncio.get_running_loop())
        with hub.watch("approval:1") as watch:
            hub.notify("approval:1")  # e.g. while the waiter was reading the row
            await asyncio.sleep(0)  # the loop runs the callback, as for a notify from a thread
            started = time.monotonic()
            woken = await watch.wait(5.0)
            took = time.monotonic() - started
            again = await watch.wait(0.05)  # the wake-up was used once
        return woken, took, again

    woken, took, again = asyncio.run(scenario())
    assert woken and took < 0.5
    assert not again


def test_wait_until_sees_a_notify_during_its_check() -> None:
    """wait_until re-checks at once when notified during a slow check, not after its poll tick."""

    async def scenario() -> float:
        hub = Hub()
        hub.bind(asyncio.get_running_loop())
        calls = 0

        async def check() -> bool | None:
            nonlocal calls
            calls += 1
            if calls == 1:
                hub.notify("tunnel:d")  # the tunnel came up while we were looking
                await asyncio.sleep(0.01)
                return None
            return True

        started = time.monotonic()
        assert await hub.wait_until("tunnel:d", check, 5.0)
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 0.2  # the poll tick is 0.25 s
