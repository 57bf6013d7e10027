"""Ask a technician's device session to end, from the menu (`close SESSION-ID`) or the portal.

The request is a row change (`close_requested`, `closed_by`); the relay holding
the session hears of it through the hub (`session:<id>`, fed by core.feed from
any process) and ends it within a second, telling the technician who did it.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from core import audit
from core.events import publish
from core.models import SshSession

CLOSED_BY_REQUEST = "closed by request"


def request_close(
    session: Session,
    *,
    session_id: str,
    account_id: int | None,
    actor: str,
    source_ip: str = "",
    only_user_id: int | None = None,
    via: str = "",
) -> SshSession | None:
    """Mark an open session of the account (or of one user) to close; None if there is none."""
    row = session.get(SshSession, session_id.lower()[:32])
    if row is None or row.ended_at is not None:
        return None
    if account_id is not None and row.account_id != account_id:
        return None
    if only_user_id is not None and row.user_id != only_user_id:
        return None
    row.close_requested = True
    row.closed_by = f"{actor} ({via})" if via else actor
    publish(session, f"session:{row.id}")
    audit.record(
        session,
        action="session.close_requested",
        actor=actor,
        account_id=row.account_id,
        target=row.device_id,
        detail=f"session={row.id}" + (f" via={via}" if via else ""),
        source_ip=source_ip,
    )
    return row


def close_reason(row: SshSession) -> str:
    """What the technician is told: who ended the session, when known."""
    return f"closed by {row.closed_by}" if row.closed_by else CLOSED_BY_REQUEST
