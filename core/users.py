"""Portal user administration: disable, role, TOTP reset, key removal (adding is core.accounts).

Every change is audited, scoped to one account, and refuses to leave the
account without an active admin: the account row is locked first (FOR UPDATE
on PostgreSQL; SQLite serialises writers), so two admins demoting each other
at once cannot both win.
"""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from core import audit, totp
from core.accounts import ROLES
from core.models import Account, PortalSession, SshSession, User, UserKey
from core.session_close import request_close
from core.validate import InvalidInput


def account_user(session: Session, *, account_id: int | None, username: str) -> User:
    """The user by name, if in `account_id` (None: any account, for a superadmin)."""
    user = session.scalar(select(User).where(User.username == username[:64]))
    if user is None or (account_id is not None and user.account_id != account_id):
        raise InvalidInput(f"user {username!r} does not exist")
    return user


def _other_active_admins(session: Session, user: User) -> int:
    session.scalar(select(Account.id).where(Account.id == user.account_id).with_for_update())
    count = session.scalar(
        select(func.count())
        .select_from(User)
        .where(
            User.account_id == user.account_id,
            User.role == "admin",
            User.disabled.is_(False),
            User.id != user.id,
        )
    )
    return int(count or 0)


def _keep_an_admin(session: Session, user: User, what: str) -> None:
    if user.role == "admin" and not user.disabled and _other_active_admins(session, user) == 0:
        raise InvalidInput(
            f"refused: {what} {user.username} would leave the account without an admin"
        )


def end_portal_sessions(session: Session, user_id: int) -> None:
    session.execute(
        update(PortalSession)
        .where(PortalSession.user_id == user_id, PortalSession.revoked.is_(False))
        .values(revoked=True)
        .execution_options(synchronize_session=False)
    )


def _record(session: Session, action: str, user: User, actor: str, detail: str, ip: str) -> None:
    audit.record(
        session,
        action=action,
        actor=actor,
        account_id=user.account_id,
        target=user.username,
        detail=detail,
        source_ip=ip,
    )


def set_disabled(
    session: Session, *, user: User, disabled: bool, actor: str, source_ip: str = ""
) -> list[str]:
    """Disable or enable a user. Disabling ends the user's portal sessions and asks every
    live SSH session acting as them to close; returns those sessions' ids (to wake)."""
    if user.disabled == disabled:
        raise InvalidInput(
            f"user {user.username} is already {'disabled' if disabled else 'enabled'}"
        )
    closing: list[str] = []
    if disabled:
        _keep_an_admin(session, user, "disabling")
        end_portal_sessions(session, user.id)
        live = select(SshSession.id).where(
            SshSession.user_id == user.id, SshSession.ended_at.is_(None)
        )
        for session_id in session.scalars(live).all():
            request_close(
                session,
                session_id=session_id,
                account_id=None,
                actor=actor,
                source_ip=source_ip,
                via="user disabled",
            )
            closing.append(session_id)
    user.disabled = disabled
    _record(session, "user.disable" if disabled else "user.enable", user, actor, "", source_ip)
    return closing


def set_role(session: Session, *, user: User, role: str, actor: str, source_ip: str = "") -> None:
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}")
    if user.role == role:
        raise InvalidInput(f"user {user.username} is already {role}")
    if role != "admin":
        _keep_an_admin(session, user, "demoting")
    old, user.role = user.role, role
    _record(session, "user.role", user, actor, f"role={role} was={old}", source_ip)


def reset_totp(session: Session, *, user: User, actor: str, source_ip: str = "") -> None:
    """A new secret, unconfirmed: the next login enrols it again; live logins end now."""
    user.totp_secret = totp.new_secret()
    user.totp_confirmed = False
    user.last_totp_step = None
    end_portal_sessions(session, user.id)
    _record(session, "user.reset_totp", user, actor, "", source_ip)


def remove_key(
    session: Session, *, user: User, key_id: int, actor: str, source_ip: str = ""
) -> str:
    """Remove one of the user's SSH keys; return its fingerprint."""
    key = session.get(UserKey, key_id)
    if key is None or key.user_id != user.id:
        raise InvalidInput(f"user {user.username} has no such key")
    fingerprint = key.fingerprint
    session.delete(key)
    _record(session, "user.remove_key", user, actor, fingerprint, source_ip)
    return fingerprint


def user_keys(session: Session, user_id: int) -> list[UserKey]:
    return list(
        session.scalars(select(UserKey).where(UserKey.user_id == user_id).order_by(UserKey.id))
    )
