"""Limits on connections that have not logged in yet, so a flood cannot starve the relay.

Caps (total and per source address) are checked in connection_made and excess
connections are dropped at once. Refusals are logged one line per burst, not
one per connection: a fleet returning after a relay restart, or a flood, would
otherwise write tens of thousands of lines a minute (`RefusalLog`).

A source that keeps failing logins earns a growing delay before each failure
answer (exponential, capped, decaying with time); the delay is an awaited
sleep inside that connection's auth handler, so the accept loop and every
other connection carry on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

PENALTY_BASE = 0.25  # seconds of delay for the first failure
PENALTY_CAP = 5.0
PENALTY_HALF_LIFE = 60.0  # a source's failure score halves every minute without failures
MAX_TRACKED_SOURCES = 10_000


REFUSAL_LOG_INTERVAL = 10.0  # seconds summarised by one line while refusals go on


@dataclass
class RefusalLog:
    """The first pre-auth refusal after a quiet spell is logged at once; the rest are counted
    and summed up in one line per `interval` until a whole interval passes without one."""

    logger: logging.Logger
    port: str  # "device" or "technician"
    interval: float = REFUSAL_LOG_INTERVAL
    _count: int = 0
    _sources: set[str] = field(default_factory=set)
    _timer: asyncio.TimerHandle | None = None

    def refused(self, source: str) -> None:
        if self._timer is None:
            self.logger.warning("%s connection refused: pre-auth limit from=%s", self.port, source)
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._flush)
            return
        self._count += 1
        if len(self._sources) < MAX_TRACKED_SOURCES:
            self._sources.add(source)

    def _flush(self) -> None:
        if not self._count:
            self._timer = None
            return
        self.logger.warning(
            "%s connections refused: pre-auth limit, %d more in the last %gs from %d sources",
            self.port, self._count, self.interval, len(self._sources),
        )  # fmt: skip
        self._count = 0
        self._sources.clear()
        self._timer = asyncio.get_running_loop().call_later(self.interval, self._flush)


@dataclass
class _Score:
    value: float
    at: float


@dataclass
class PreauthLimiter:
    """Per-process counters of unauthenticated connections and failing sources."""

    max_total: int
    max_per_source: int
    clock: Callable[[], float] = time.monotonic
    refusals: RefusalLog | None = None
    _open: Counter[str] = field(default_factory=Counter)
    _total: int = 0
    _scores: dict[str, _Score] = field(default_factory=dict)

    def admit(self, source: str) -> bool:
        """Count a new unauthenticated connection, or refuse it (nothing counted)."""
        if self._total >= self.max_total or self._open[source] >= self.max_per_source:
            if self.refusals is not None:
                self.refusals.refused(source)
            return False
        self._total += 1
        self._open[source] += 1
        return True

    def release(self, source: str) -> None:
        """The connection logged in or went away."""
        if self._open[source] <= 0:
            return
        self._total -= 1
        self._open[source] -= 1
        if not self._open[source]:
            del self._open[source]

    def _decayed(self, source: str, now: float) -> float:
        score = self._scores.get(source)
        if score is None:
            return 0.0
        return score.value * math.pow(0.5, (now - score.at) / PENALTY_HALF_LIFE)

    def failure(self, source: str) -> float:
        """Record a failed login and return how long to wait before answering it."""
        now = self.clock()
        value = self._decayed(source, now) + 1.0
        if source not in self._scores and len(self._scores) >= MAX_TRACKED_SOURCES:
            self._forget_lowest()
        self._scores[source] = _Score(value, now)
        return self.penalty(value)

    @staticmethod
    def penalty(score: float) -> float:
        if score < 1.0:
            return 0.0
        return min(PENALTY_CAP, PENALTY_BASE * math.pow(2.0, score - 1.0))

    def current_penalty(self, source: str) -> float:
        return self.penalty(self._decayed(source, self.clock()))

    def _forget_lowest(self) -> None:
        now = self.clock()
        for source in sorted(self._scores, key=lambda s: self._decayed(s, now))[:1000]:
            del self._scores[source]
