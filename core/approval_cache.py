"""Remembered approvals (`relay.approval_cache`): reconnect without a new approval for a while.

A grant is written when the relay sees a key login approved: the same portal
user, with the same SSH key, from the same source address may then log in
again until it expires, and each such login is an approved Approval row of its
own (`decided_via = "cache"`), audited `approval.cache_used`. Only key logins
are remembered: the shared login's password is not a secret, so "partner from
this address" says nothing about who is at the keyboard.

Revoking a grant (portal, audited) stops the next login from using it; it ends
nothing that is already running.
"""

from __future__ import annotations

import secrets
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import audit
from core.approvals import new_code, token_hash
from core.models import Approval, ApprovalGrant, User, utcnow
from core.validate import InvalidInput


def remember(
    session: Session, *, approval: Approval, user: User, key_fingerprint: str, ttl: float
) -> ApprovalGrant:
    """A grant for this approved key login, valid `ttl` seconds from now."""
    grant = ApprovalGrant(
        user_id=user.id,
        account_id=user.account_id,
        approval_id=approval.id,
        ssh_login=approval.ssh_login,
        key_fingerprint=key_fingerprint,
        client_ip=approval.client_ip,
        expires_at=utcnow() + timedelta(seconds=ttl),
    )
    session.add(grant)
    session.flush()
    audit.record(
        session,
        action="approval_cache.granted",
        actor=user.username,
        account_id=user.account_id,
        target=f"grant:{grant.id}",
        detail=f"approval={approval.id} key={key_fingerprint} until={grant.expires_at:%H:%M:%S}",
        source_ip=approval.client_ip,
    )
    return grant


def find(
    session: Session, *, user_id: int, key_fingerprint: str, client_ip: str
) -> ApprovalGrant | None:
    """The newest live grant for exactly this user, key and address."""
    return session.scalar(
        select(ApprovalGrant)
        .where(
            ApprovalGrant.user_id == user_id,
            ApprovalGrant.key_fingerprint == key_fingerprint,
            ApprovalGrant.client_ip == client_ip,
            ApprovalGrant.revoked_at.is_(None),
            ApprovalGrant.expires_at > utcnow(),
        )
        .order_by(ApprovalGrant.expires_at.desc())
        .limit(1)
    )


def use(
    session: Session,
    *,
    grant: ApprovalGrant,
    client_version: str,
    relay_node: str,
) -> Approval | None:
    """An approved Approval row for a login let in by `grant` (audited); None if the grant
    was revoked or expired since it was read."""
    now = utcnow()
    used = session.execute(
        update(ApprovalGrant)
        .where(
            ApprovalGrant.id == grant.id,
            ApprovalGrant.revoked_at.is_(None),
            ApprovalGrant.expires_at > now,
        )
        .values(uses=ApprovalGrant.uses + 1, last_used_at=now)
        .execution_options(synchronize_session=False)
    )
    if getattr(used, "rowcount", 0) != 1:
        return None
    approval = Approval(
        token_hash=token_hash(secrets.token_urlsafe(24)),  # never shown: nothing to open
        code=new_code(),
        ssh_login=grant.ssh_login,
        required_user_id=grant.user_id,
        client_ip=grant.client_ip,
        client_version=client_version[:256],
        relay_node=relay_node,
        status="approved",
        expires_at=now,
        decided_at=now,
        decided_by=grant.user_id,
        account_id=grant.account_id,
        key_fingerprint=grant.key_fingerprint,
        decided_via="cache",
    )
    session.add(approval)
    session.flush()
    audit.record(
        session,
        action="approval.cache_used",
        actor=grant.ssh_login,
        account_id=grant.account_id,
        target=f"approval:{approval.id}",
        detail=f"grant={grant.id} key={grant.key_fingerprint}",
        source_ip=grant.client_ip,
    )
    return approval


def visible(session: Session, *, user: User, include_old: bool = False) -> list[ApprovalGrant]:
    """Grants an admin sees for the account (a superadmin: all), others only their own."""
    query = select(ApprovalGrant)
    if user.is_superadmin:
        pass
    elif user.role == "admin":
        query = query.where(ApprovalGrant.account_id == user.account_id)
    else:
        query = query.where(ApprovalGrant.user_id == user.id)
    if not include_old:
        query = query.where(ApprovalGrant.revoked_at.is_(None), ApprovalGrant.expires_at > utcnow())
    return list(session.scalars(query.order_by(ApprovalGrant.id.desc()).limit(500)))


def revoke(session: Session, *, grant_id: int, user: User, source_ip: str) -> ApprovalGrant:
    """Revoke a live grant the user may see; the next login from it needs an approval again."""
    grant = session.get(ApprovalGrant, grant_id)
    allowed = grant is not None and (
        user.is_superadmin
        or (user.role == "admin" and grant.account_id == user.account_id)
        or grant.user_id == user.id
    )
    if grant is None or not allowed:
        raise InvalidInput("no such remembered approval")
    done = session.execute(
        update(ApprovalGrant)
        .where(ApprovalGrant.id == grant_id, ApprovalGrant.revoked_at.is_(None))
        .values(revoked_at=utcnow(), revoked_by=user.username)
        .execution_options(synchronize_session=False)
    )
    if getattr(done, "rowcount", 0) != 1:
        raise InvalidInput("this remembered approval was already revoked")
    audit.record(
        session,
        action="approval_cache.revoked",
        actor=user.username,
        account_id=grant.account_id,
        target=f"grant:{grant.id}",
        detail=f"key={grant.key_fingerprint} from={grant.client_ip}",
        source_ip=source_ip,
    )
    session.refresh(grant)
    return grant
