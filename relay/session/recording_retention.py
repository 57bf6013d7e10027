"""Delete recordings older than `relay.recording_retention`, each deletion audited.

Each relay sweeps its own `<data_dir>/recordings` at start and then every
tenth of the retention (between 1 s and 1 h). A file counts as expired when it
was last written longer ago than the retention and its session has ended, so a
live session's recording is never deleted, however long it has been idle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from sqlalchemy.orm import Session

from core import audit
from core.models import SshSession
from relay.context import RelayContext

log = logging.getLogger(__name__)


def expired_files(directory: Path, retention: float, now: float) -> list[Path]:
    try:
        candidates = sorted(directory.glob("*.cast"))
    except OSError:
        return []
    found = []
    for path in candidates:
        try:
            if now - path.stat().st_mtime > retention:
                found.append(path)
        except OSError:
            continue
    return found


def sweep(ctx: RelayContext) -> int:
    """Delete this relay's expired recordings; return how many were deleted."""
    retention = ctx.settings.relay.recording_retention
    files = expired_files(ctx.settings.data_dir / "recordings", retention, time.time())
    if not files:
        return 0
    deleted: list[tuple[str, SshSession | None]] = []
    with ctx.sessions() as session, session.begin():
        for path in files:
            row = session.get(SshSession, path.stem[:32])
            if row is not None and row.ended_at is None:
                continue  # still live
            try:
                path.unlink()
            except OSError as exc:
                log.warning("recording not deleted path=%s error=%s", path, exc)
                continue
            deleted.append((path.stem, row))
        for stem, row in deleted:
            _audit(session, ctx, stem, row, retention)
    for stem, _row in deleted:
        log.info("recording expired session=%s", stem)
    return len(deleted)


def _audit(
    session: Session, ctx: RelayContext, stem: str, row: SshSession | None, retention: float
) -> None:
    audit.record(
        session,
        action="recording.expired",
        actor=f"relay:{ctx.node_name}",
        account_id=row.account_id if row is not None else None,
        target=row.device_id if row is not None else "",
        detail=f"session={stem} retention={retention:g}s",
    )


async def run_retention(ctx: RelayContext) -> None:
    """The periodic sweep; returns at once when retention is off (0)."""
    retention = ctx.settings.relay.recording_retention
    if retention <= 0:
        return
    interval = min(max(retention / 10, 1.0), 3600.0)
    while True:
        try:
            await asyncio.to_thread(sweep, ctx)
        except Exception as exc:  # the database may be away for a while: try again later
            log.warning("recording retention sweep failed: %s", type(exc).__name__)
        await asyncio.sleep(interval)
