"""Approval tokens: created by the relay, decided once in the portal.

The token (>= 128 bits) is shown once and stored only as a SHA-256 hash. A
decision is one conditional UPDATE (still pending, not expired), so of two
concurrent approvals of one token exactly one wins.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import audit
from core.models import Approval, User, utcnow

CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"


class ApprovalError(ValueError):
    """The token is unknown, used, expired or not yours; one line for the page."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_code() -> str:
    raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(6))
    return f"{raw[:3]}-{raw[3:]}"


def create_approval(
    session: Session,
    *,
    ssh_login: str,
    required_user_id: int | None,
    client_ip: str,
    client_version: str,
    relay_node: str,
    ttl: float,
) -> tuple[Approval, str]:
    """A pending approval and its token (returned once, never stored)."""
    token = secrets.token_urlsafe(24)  # 192 bits
    approval = Approval(
        token_hash=token_hash(token),
        code=new_code(),
        ssh_login=ssh_login,
        required_user_id=required_user_id,
        client_ip=client_ip,
        client_version=client_version[:256],
        relay_node=relay_node,
        expires_at=utcnow() + timedelta(seconds=ttl),
    )
    session.add(approval)
    session.flush()
    audit.record(
        session,
        action="approval.requested",
        actor=ssh_login,
        target=f"approval:{approval.id}",
        detail=f"code={approval.code} client={approval.client_version}",
        source_ip=client_ip,
    )
    return approval, token


def find_by_token(session: Session, token: str) -> Approval | None:
    if not token or len(token) > 128:
        return None
    return session.scalar(select(Approval).where(Approval.token_hash == token_hash(token)))


def decide(session: Session, *, token: str, user: User, approve: bool, source_ip: str) -> Approval:
    """Approve or reject a pending approval; raise ApprovalError if it cannot be decided."""
    approval = find_by_token(session, token)
    if approval is None:
        raise ApprovalError("This approval link is not valid.")
    now = utcnow()
    if approval.status != "pending":
        raise ApprovalError(f"This request was already {approval.status}.")
    if approval.expires_at <= now:
        raise ApprovalError("This request has expired.")
    if approval.required_user_id is not None and approval.required_user_id != user.id:
        raise ApprovalError("Only the portal user who owns this SSH key may approve this session.")
    status = "approved" if approve else "rejected"
    result = session.execute(
        update(Approval)
        .where(Approval.id == approval.id, Approval.status == "pending", Approval.expires_at > now)
        .values(status=status, decided_at=now, decided_by=user.id, account_id=user.account_id)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        raise ApprovalError("This request was already decided.")
    audit.record(
        session,
        action=f"approval.{status}",
        actor=user.username,
        account_id=user.account_id,
        target=f"approval:{approval.id}",
        detail=f"code={approval.code} ssh_from={approval.client_ip}",
        source_ip=source_ip,
    )
    session.refresh(approval)
    return approval


def close_pending(session: Session, *, approval_id: int, status: str, actor: str) -> bool:
    """Mark a still-pending approval expired or abandoned (the SSH side gave up)."""
    result = session.execute(
        update(Approval)
        .where(Approval.id == approval_id, Approval.status == "pending")
        .values(status=status, decided_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    changed = getattr(result, "rowcount", 0) == 1
    if changed:
        audit.record(
            session, action=f"approval.{status}", actor=actor, target=f"approval:{approval_id}"
        )
    return bool(changed)
