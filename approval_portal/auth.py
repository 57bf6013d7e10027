"""Portal login: password + TOTP, server-side sessions, rate limits, audit.

The cookie carries a random token; the database keeps only its SHA-256 (the
PortalSession id), so a leaked database row cannot be replayed as a cookie and
logout revokes the session for good. A failed login costs one argon2
verification whether or not the user exists.
"""

from __future__ import annotations

import enum
import hashlib
import os
import secrets
import threading
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from approval_portal.context import Portal
from core import audit, totp
from core.models import PortalSession, User, utcnow
from core.passwords import verify_password
from core.validate import strip_controls

PARTIAL_TTL = 600.0  # a password-only session (TOTP enrolment) lives at most 10 minutes
# argon2 takes ~64 MiB per verification: bound how many run at once
_VERIFY_SLOTS = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))


class Outcome(enum.Enum):
    OK = "ok"
    ENROL = "enrol"
    FAILED = "failed"
    LIMITED = "limited"


@dataclass(frozen=True)
class Viewer:
    """The logged-in user as the pages see it (a snapshot, not an ORM row)."""

    session_id: str
    csrf: str
    totp_ok: bool
    user_id: int
    username: str
    account_id: int
    account_name: str
    role: str
    is_superadmin: bool

    @property
    def is_admin(self) -> bool:
        return self.role == "admin" or self.is_superadmin


def session_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_session(session: Session, *, user_id: int, totp_ok: bool, ttl: float) -> str:
    """Add a PortalSession and return the cookie token (never stored)."""
    token = secrets.token_urlsafe(32)
    session.add(
        PortalSession(
            id=session_id(token),
            user_id=user_id,
            csrf_token=secrets.token_urlsafe(32),
            expires_at=utcnow() + timedelta(seconds=ttl),
            totp_ok=totp_ok,
        )
    )
    return token


def load_viewer(portal: Portal, token: str) -> Viewer | None:
    """The live session for a cookie token, or None (unknown, revoked, expired, disabled)."""
    if not token or len(token) > 128:
        return None
    with portal.sessions() as session:
        row = session.execute(
            select(PortalSession, User)
            .join(User, User.id == PortalSession.user_id)
            .where(
                PortalSession.id == session_id(token),
                PortalSession.revoked.is_(False),
                PortalSession.expires_at > utcnow(),
                User.disabled.is_(False),
            )
        ).first()
        if row is None:
            return None
        ps, user = row
        return Viewer(
            session_id=ps.id,
            csrf=ps.csrf_token,
            totp_ok=ps.totp_ok,
            user_id=user.id,
            username=user.username,
            account_id=user.account_id,
            account_name=user.account.name,
            role=user.role,
            is_superadmin=user.is_superadmin,
        )


def revoke_session(session: Session, sid: str) -> None:
    session.execute(
        update(PortalSession)
        .where(PortalSession.id == sid)
        .values(revoked=True)
        .execution_options(synchronize_session=False)
    )


def _limit_keys(username: str, source_ip: str) -> tuple[str, str]:
    return f"user:{username.strip().lower()[:64]}", f"ip:{source_ip}"


def is_limited(portal: Portal, username: str, source_ip: str) -> bool:
    user_key, source_key = _limit_keys(username, source_ip)
    now = portal.clock()
    return portal.user_limit.blocked(user_key, now) or portal.source_limit.blocked(source_key, now)


def note_failure(portal: Portal, username: str, source_ip: str) -> None:
    user_key, source_key = _limit_keys(username, source_ip)
    now = portal.clock()
    portal.user_limit.hit(user_key, now)
    portal.source_limit.hit(source_key, now)


def login(
    portal: Portal, *, username: str, password: str, code: str, source_ip: str
) -> tuple[Outcome, str]:
    """Check password then TOTP; return the outcome and, unless failed, a new cookie token."""
    name = username.strip().lower()[:64]
    if is_limited(portal, name, source_ip):
        _audit_failure(portal, name, None, "rate_limited", source_ip)
        return Outcome.LIMITED, ""
    with portal.sessions() as session:
        user = session.scalar(select(User).where(User.username == name)) if name else None
    with _VERIFY_SLOTS:
        password_ok = verify_password(user.password_hash if user else None, password[:1024])
    if user is None or not password_ok or user.disabled:
        reason = "unknown_user" if user is None else "disabled" if user.disabled else "password"
        return _fail(portal, name, user, reason, source_ip)
    with portal.sessions() as session, session.begin():
        if not user.totp_confirmed:
            token = create_session(session, user_id=user.id, totp_ok=False, ttl=_partial(portal))
            _audit(session, "portal.login_password_ok", user, "totp enrolment", source_ip)
            return Outcome.ENROL, token
        if totp.consume_code(session, user, code, now=portal.clock()):
            token = create_session(
                session, user_id=user.id, totp_ok=True, ttl=portal.settings.portal.session_ttl
            )
            _audit(session, "portal.login_ok", user, "", source_ip)
            portal.user_limit.reset(_limit_keys(name, source_ip)[0])
            return Outcome.OK, token
    return _fail(portal, name, user, "totp", source_ip)


def _partial(portal: Portal) -> float:
    return min(PARTIAL_TTL, portal.settings.portal.session_ttl)


def _fail(
    portal: Portal, name: str, user: User | None, reason: str, source_ip: str
) -> tuple[Outcome, str]:
    note_failure(portal, name, source_ip)
    _audit_failure(portal, name, user, reason, source_ip)
    return Outcome.FAILED, ""


def _audit_failure(
    portal: Portal, name: str, user: User | None, reason: str, source_ip: str
) -> None:
    """Record who tried and why it failed; never the password or the code."""
    with portal.sessions() as session, session.begin():
        audit.record(
            session,
            action="portal.login_failed",
            actor=strip_controls(name)[:64],
            account_id=user.account_id if user else None,
            target=f"user:{user.username}" if user else "",
            detail=f"reason={reason}",
            source_ip=source_ip,
        )


def _audit(session: Session, action: str, user: User, detail: str, source_ip: str) -> None:
    audit.record(
        session,
        action=action,
        actor=user.username,
        account_id=user.account_id,
        target=f"user:{user.username}",
        detail=detail,
        source_ip=source_ip,
    )
