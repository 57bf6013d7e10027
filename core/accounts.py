"""Accounts, portal users and their SSH keys: the data functions admins call."""

from __future__ import annotations

import asyncssh
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import audit, totp, validate
from core.models import Account, User, UserKey
from core.passwords import MIN_LENGTH, hash_password
from core.validate import InvalidInput

ROLES = ("admin", "technician")


def get_account(session: Session, name: str) -> Account:
    account = session.scalar(select(Account).where(Account.name == name))
    if account is None:
        raise InvalidInput(f"account {name!r} does not exist")
    return account


def add_account(session: Session, *, name: str, actor: str) -> Account:
    validate.account_name(name)
    if session.scalar(select(Account).where(Account.name == name)) is not None:
        raise InvalidInput(f"account {name!r} already exists")
    account = Account(name=name)
    session.add(account)
    session.flush()
    audit.record(session, action="account.add", actor=actor, account_id=account.id, target=name)
    return account


def add_user(
    session: Session, *, username: str, account_name: str, role: str, password: str, actor: str
) -> User:
    validate.username(username)
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}")
    if len(password) < MIN_LENGTH:
        raise InvalidInput(f"password must be at least {MIN_LENGTH} characters")
    account = get_account(session, account_name)
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise InvalidInput(f"user {username!r} already exists")
    user = User(
        account_id=account.id,
        username=username,
        password_hash=hash_password(password),
        totp_secret=totp.new_secret(),
        role=role,
    )
    session.add(user)
    session.flush()
    audit.record(
        session,
        action="user.add",
        actor=actor,
        account_id=account.id,
        target=username,
        detail=f"role={role}",
    )
    return user


def get_user(session: Session, username: str) -> User:
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise InvalidInput(f"user {username!r} does not exist")
    return user


def parse_public_key(text: str) -> tuple[asyncssh.SSHKey, str]:
    """One OpenSSH public key line -> (key, comment); refuse anything else."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) != 1:
        raise InvalidInput("expected exactly one OpenSSH public key line")
    try:
        key = asyncssh.import_public_key(lines[0])
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise InvalidInput(f"not an OpenSSH public key: {exc}") from None
    parts = lines[0].split(None, 2)
    comment = validate.strip_controls(parts[2]) if len(parts) > 2 else ""
    return key, comment[:256]


def add_user_key(session: Session, *, username: str, key_text: str, actor: str) -> UserKey:
    user = get_user(session, username)
    key, comment = parse_public_key(key_text)
    fingerprint = key.get_fingerprint()
    if session.scalar(select(UserKey).where(UserKey.fingerprint == fingerprint)) is not None:
        raise InvalidInput(f"key {fingerprint} is already registered")
    row = UserKey(
        user_id=user.id,
        public_key=key.export_public_key().decode().strip(),
        fingerprint=fingerprint,
        comment=comment,
    )
    session.add(row)
    audit.record(
        session,
        action="user.add_key",
        actor=actor,
        account_id=user.account_id,
        target=username,
        detail=fingerprint,
    )
    return row
