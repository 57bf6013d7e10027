"""Audit rows: one per decision, never containing a secret."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from core.models import AuditEvent

log = logging.getLogger(__name__)


def record(
    session: Session,
    *,
    action: str,
    actor: str = "",
    account_id: int | None = None,
    target: str = "",
    detail: str = "",
    source_ip: str = "",
) -> AuditEvent:
    """Add an audit row to the caller's transaction (committed with it)."""
    event = AuditEvent(
        action=action,
        actor=actor[:128],
        account_id=account_id,
        target=target[:256],
        detail=detail,
        source_ip=source_ip[:64],
    )
    session.add(event)
    log.info("audit action=%s actor=%s target=%s", action, actor, target)
    return event
