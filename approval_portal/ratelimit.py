"""In-memory sliding-window counters for failed logins (per user, per source).

One process keeps its own counts; with several portal processes an attacker
gets at most that many times the limit, which still stops brute force.
"""

from __future__ import annotations

import threading
from collections import deque

MAX_KEYS = 50_000


class SlidingWindow:
    """At most `limit` failures per key within `window` seconds; limit 0 disables it."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, key: str, now: float) -> bool:
        if self.limit <= 0:
            return False
        with self._lock:
            hits = self._hits.get(key)
            if hits is None:
                return False
            self._expire(hits, now)
            return len(hits) >= self.limit

    def hit(self, key: str, now: float) -> None:
        if self.limit <= 0:
            return
        with self._lock:
            if key not in self._hits and len(self._hits) >= MAX_KEYS:
                self._prune(now)
            hits = self._hits.setdefault(key, deque())
            self._expire(hits, now)
            hits.append(now)

    def reset(self, key: str) -> None:
        with self._lock:
            self._hits.pop(key, None)

    def _expire(self, hits: deque[float], now: float) -> None:
        while hits and hits[0] <= now - self.window:
            hits.popleft()

    def _prune(self, now: float) -> None:
        """Drop expired keys; if still full, drop the oldest half (memory stays bounded)."""
        for key in [k for k, v in self._hits.items() if not v or v[-1] <= now - self.window]:
            del self._hits[key]
        if len(self._hits) >= MAX_KEYS:
            for key in list(self._hits)[: MAX_KEYS // 2]:
                del self._hits[key]
