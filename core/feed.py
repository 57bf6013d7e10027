"""Turn database changes made by any process into hub wake-ups.

One poller per process reads what changed since its last look (decided
approvals, device tunnel requests, session close requests), so waiters never
poll the database themselves and several processes on one PostgreSQL agree
within a second.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.hub import Hub
from core.models import Approval, Device, SshSession, utcnow

log = logging.getLogger(__name__)
FEED_INTERVAL = 0.3


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


async def run_feed(sessions: sessionmaker[Session], hub: Hub) -> None:
    """Forever: notify the hub of rows changed since the previous round."""
    since = utcnow() - timedelta(seconds=1)
    while True:
        await asyncio.sleep(FEED_INTERVAL)
        now = utcnow()
        try:
            topics = await asyncio.to_thread(_read, sessions, since)
        except SQLAlchemyError as exc:
            log.warning("change feed: database unavailable: %s", type(exc).__name__)
            continue
        since = now - timedelta(seconds=FEED_INTERVAL)  # overlap: clocks of writers differ a little
        for topic in topics:
            hub.notify(topic)


def _read(sessions: sessionmaker[Session], since: datetime) -> list[str]:
    with sessions() as session:
        return _changes(session, since)
