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
from core.events import publish
from core.models import Account, Approval, User, utcnow
from core.validate import InvalidInput

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
    key_fingerprint: str | None = None,
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
        key_fingerprint=key_fingerprint,
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
    return decide_approval(
        session, approval=approval, user=user, approve=approve, source_ip=source_ip
    )


def decide_approval(
    session: Session, *, approval: Approval, user: User, approve: bool, source_ip: str
) -> Approval:
    """The decision itself, for a row found by token or (dashboard) by id: every rule is here."""
    now = utcnow()
    if approval.status != "pending":
        raise ApprovalError(f"This request was already {approval.status}.")
    if approval.expires_at <= now:
        raise ApprovalError("This request has expired.")
    refusal = approver_refusal(session, approval, user, approve=approve)
    if refusal is not None:
        raise ApprovalError(refusal)
    status = "approved" if approve else "rejected"
    owner = session.get(User, approval.required_user_id) if approval.required_user_id else None
    result = session.execute(
        update(Approval)
        .where(Approval.id == approval.id, Approval.status == "pending", Approval.expires_at > now)
        .values(
            status=status,
            decided_at=now,
            decided_by=user.id,
            account_id=(owner or user).account_id,
            decided_via="portal",
        )
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        raise ApprovalError("This request was already decided.")
    publish(session, f"approval:{approval.id}")
    audit.record(
        session,
        action=f"approval.{status}",
        actor=user.username,
        account_id=(owner or user).account_id,
        target=f"approval:{approval.id}",
        detail=f"code={approval.code} ssh_from={approval.client_ip}"
        + (f" for={owner.username}" if owner is not None and owner.id != user.id else ""),
        source_ip=source_ip,
    )
    session.refresh(approval)
    return approval


def approver_refusal(
    session: Session, approval: Approval, user: User, *, approve: bool = True
) -> str | None:
    """Why `user` may not decide this request (one sentence), or None.

    A key login is decided by the key's owner; when the owner's account asks for
    a second person, by another user of that account instead (never the owner).
    Such an account's users cannot approve shared-login requests at all: only a
    key login says who is at the keyboard, so only then is the approver someone else.
    Rejecting a shared-login request is always allowed.
    """
    owner = session.get(User, approval.required_user_id) if approval.required_user_id else None
    if owner is None:
        if approve and user.account.second_approver:
            return (
                f"Account {user.account.name} requires a second person's approval: "
                "log in with your registered SSH key and ask a colleague to approve."
            )
        return None
    if not owner.account.second_approver:
        if owner.id != user.id:
            return "Only the portal user who owns this SSH key may approve this session."
        return None
    if owner.id == user.id:
        return (
            f"Account {owner.account.name} requires a second person: someone other than "
            f"{owner.username} must approve this session."
        )
    if user.account_id != owner.account_id and not user.is_superadmin:
        return f"Only a user of account {owner.account.name} may approve this session."
    return None


def acting_user(session: Session, approval: Approval) -> User | None:
    """The portal user an approved session acts as: the key's owner, else the approver."""
    user_id = approval.required_user_id or approval.decided_by
    return session.get(User, user_id) if user_id is not None else None


def normalise_code(code: str) -> str:
    raw = "".join(ch for ch in code.upper() if ch.isalnum())
    return f"{raw[:3]}-{raw[3:]}" if len(raw) == 6 else code.strip().upper()[:16]


def approve_by_code(
    session: Session, *, code: str, username: str | None, actor: str
) -> tuple[Approval, str]:
    """Approve the one pending request showing `code` (an admin at the server: `rly approve`).

    A key login acts as the key's owner; a shared-login request needs `username`,
    the portal user the session will act as. Returns the row and that user's name.
    """
    wanted, now = normalise_code(code), utcnow()
    found = list(
        session.scalars(
            select(Approval).where(
                Approval.code == wanted, Approval.status == "pending", Approval.expires_at > now
            )
        )
    )
    if not found:
        raise ApprovalError(f"no pending approval request has the code {wanted}")
    if len(found) > 1:
        raise ApprovalError(
            f"{len(found)} pending requests have the code {wanted}; approve in the portal"
        )
    approval = found[0]
    user = _cli_acting_user(session, approval, username)
    result = session.execute(
        update(Approval)
        .where(Approval.id == approval.id, Approval.status == "pending", Approval.expires_at > now)
        .values(
            status="approved",
            decided_at=now,
            decided_by=user.id,
            account_id=user.account_id,
            decided_via="cli",
        )
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        raise ApprovalError("this request was decided a moment ago")
    publish(session, f"approval:{approval.id}")
    audit.record(
        session,
        action="approval.approved",
        actor=actor,
        account_id=user.account_id,
        target=f"approval:{approval.id}",
        detail=f"code={approval.code} ssh_from={approval.client_ip} via=cli for={user.username}",
    )
    session.refresh(approval)
    return approval, user.username


def _cli_acting_user(session: Session, approval: Approval, username: str | None) -> User:
    owner = session.get(User, approval.required_user_id) if approval.required_user_id else None
    if owner is not None:
        if username is not None and username != owner.username:
            raise ApprovalError(
                f"this request is a key login of {owner.username}; it can only act as them"
            )
        user = owner
    elif username is None:
        raise ApprovalError(
            f"this request came from the shared login {approval.ssh_login!r}: "
            "name the portal user it acts as with --user NAME"
        )
    else:
        named = session.scalar(select(User).where(User.username == username))
        if named is None:
            raise ApprovalError(f"user {username!r} does not exist")
        user = named
    if user.disabled:
        raise ApprovalError(f"user {user.username!r} is disabled")
    return user


def set_second_approver(session: Session, *, account_name: str, on: bool, actor: str) -> Account:
    """Turn second-person approval on or off for an account (audited)."""
    account = session.scalar(select(Account).where(Account.name == account_name))
    if account is None:
        raise InvalidInput(f"account {account_name!r} does not exist")
    account.second_approver = on
    audit.record(
        session,
        action="account.second_approver",
        actor=actor,
        account_id=account.id,
        target=account.name,
        detail="on" if on else "off",
    )
    return account


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
