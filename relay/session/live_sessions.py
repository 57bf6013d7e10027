"""Byte counters of the device sessions running in this relay process, by session id.

The pumps count bytes in memory (relay.session.bridge.Traffic) and the session row gets
them only every ~30 s and at the end, so `show` reads this registry for the
sessions this relay holds and the database for those of other relays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.session.bridge import Traffic


@dataclass(frozen=True)
class LiveCounts:
    """A session's bytes so far, and seconds since its last byte (None: no byte yet)."""

    up: int
    down: int
    idle: float | None


class LiveSessions:
    """Session id -> its Traffic, from the session row's start to its end."""

    def __init__(self) -> None:
        self._traffic: dict[str, Traffic] = {}

    def add(self, session_id: str, traffic: Traffic) -> None:
        self._traffic[session_id] = traffic

    def remove(self, session_id: str) -> None:
        self._traffic.pop(session_id, None)

    def snapshot(self, now: float) -> dict[str, LiveCounts]:
        """The counts at `now` (the event loop's clock, which Traffic.last_activity uses)."""
        return {
            session_id: LiveCounts(
                t.up, t.down, max(now - t.last_activity, 0.0) if t.last_activity else None
            )
            for session_id, t in self._traffic.items()
        }
