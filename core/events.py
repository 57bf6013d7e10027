"""Cross-process events on PostgreSQL: NOTIFY in the writer's transaction, one LISTEN per process.

A writer calls `publish(session, topic)` in the transaction that makes the
change; PostgreSQL delivers `NOTIFY rly_events, '<topic>'` to every listener
only when that transaction commits (and never if it rolls back), so a wake-up
never arrives before the row it announces. Each process runs one `Listener`:
a dedicated psycopg connection in a thread that turns notifications into
`hub.notify(topic)`. On SQLite `publish` does nothing and core.feed polls.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from core.hub import Hub

log = logging.getLogger(__name__)
CHANNEL = "rly_events"
MAX_TOPIC = 7000  # NOTIFY payloads must stay under 8000 bytes
RETRY_FIRST, RETRY_CAP = 0.5, 10.0
WAKE_EVERY = 1.0  # how often the listener thread looks at its stop flag
_NOTIFY = text("SELECT pg_notify(:channel, :topic)")


def publish(session: Session, topic: str) -> None:
    """Announce `topic` to every process when this transaction commits (PostgreSQL only)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_NOTIFY, {"channel": CHANNEL, "topic": topic[:MAX_TOPIC]})


def libpq_url(sqlalchemy_url: str) -> str:
    """`postgresql+psycopg://…` as a plain libpq URL for psycopg.connect."""
    url = make_url(sqlalchemy_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


class Listener:
    """One LISTEN connection in a thread; reconnects with backoff; reports whether it is live.

    `on_live(True)` is called after each (re)connect (the caller then reads what
    it may have missed), `on_live(False)` when the connection is lost.
    """

    def __init__(
        self, url: str, hub: Hub, on_live: Callable[[bool], None], *, name: str = "rly"
    ) -> None:
        self._url = libpq_url(url)
        self._hub = hub
        self._on_live = on_live
        self._name = name[:40]
        self._stop = threading.Event()
        self._live = False
        self._thread = threading.Thread(target=self._run, name="rly-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        delay = RETRY_FIRST
        while not self._stop.is_set():
            self._live = False
            try:
                self._listen()
            except psycopg.Error as exc:
                if self._live:  # it worked until now: come back quickly
                    delay = RETRY_FIRST
                log.warning("event listener: %s; retry in %.1fs", _one_line(exc), delay)
            except Exception:  # the thread's entry point: keep listening, the poll covers the gap
                log.exception("event listener failed; retry in %.1fs", delay)
            finally:
                self._on_live(False)
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, RETRY_CAP)

    def _listen(self) -> None:
        with psycopg.connect(
            self._url,
            autocommit=True,
            connect_timeout=5,
            application_name=f"rly events {self._name}",
            keepalives=1,  # a silent server is detected by the kernel, not by a query
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        ) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            log.info("event listener: LISTEN %s", CHANNEL)
            self._live = True
            self._on_live(True)
            while not self._stop.is_set():
                for note in conn.notifies(timeout=WAKE_EVERY):
                    self._hub.notify(note.payload)


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
