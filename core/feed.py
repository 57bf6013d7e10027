"""Turn database changes made by any process into hub wake-ups.

On PostgreSQL, writers NOTIFY in their transaction (core.events) and one
LISTEN connection per process delivers each change within milliseconds; the
poll below then runs only every SAFETY_INTERVAL as the safety net for a
notification lost with a dropped connection, and at once after each
(re)connect. Without a live LISTEN (SQLite, `database_notify = false`, or
while the listener reconnects) it polls every FEED_INTERVAL, as before.
The poll reads what changed since its last look (decided approvals, device
tunnel requests, session close requests), so waiters never poll themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.events import Listener
from core.hub import Hub
from core.models import Approval, Device, SshSession, utcnow

log = logging.getLogger(__name__)
FEED_INTERVAL = 0.3
SAFETY_INTERVAL = 2.0
OVERLAP = timedelta(seconds=FEED_INTERVAL)  # writers' clocks differ a little; repeats are harmless


def _changes(session: Session, since: datetime) -> list[str]:
    topics = [
        f"approval:{i}"
        for i in session.scalars(select(Approval.id).where(Approval.decided_at > since))
    ]
    topics += [
        f"device:{i}"
        for i in session.scalars(select(Device.id).where(Device.tunnel_request_at > since))
    ]
    topics += [
        f"session:{i}"
        for i in session.scalars(
            select(SshSession.id).where(SshSession.close_requested, SshSession.ended_at.is_(None))
        )
    ]
    return topics


class _LiveFlag:
    """Whether LISTEN is live, set from the listener thread; a change wakes the poll loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.live = False
        self.changed = asyncio.Event()
        self._loop = loop

    def set(self, live: bool) -> None:
        def apply() -> None:
            self.live = live
            self.changed.set()

        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._loop.call_soon_threadsafe(apply)


async def run_feed(
    sessions: sessionmaker[Session], hub: Hub, *, listen: bool = True, name: str = "rly"
) -> None:
    """Forever: notify the hub of changes (LISTEN on PostgreSQL when `listen`, else polling)."""
    url = sessions.kw["bind"].url
    flag = _LiveFlag(asyncio.get_running_loop())
    listener = None
    if listen and url.get_backend_name() == "postgresql":
        listener = Listener(url.render_as_string(hide_password=False), hub, flag.set, name=name)
        listener.start()
    since = utcnow() - OVERLAP
    try:
        while True:
            interval = SAFETY_INTERVAL if flag.live else FEED_INTERVAL
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(flag.changed.wait(), interval)
            flag.changed.clear()
            now = utcnow()
            try:
                topics = await asyncio.to_thread(_read, sessions, since)
            except SQLAlchemyError as exc:
                log.warning("change feed: database unavailable: %s", type(exc).__name__)
                continue
            since = now - OVERLAP
            for topic in topics:
                hub.notify(topic)
    finally:
        if listener is not None:
            await asyncio.to_thread(listener.stop)


def _read(sessions: sessionmaker[Session], since: datetime) -> list[str]:
    with sessions() as session:
        return _changes(session, since)
