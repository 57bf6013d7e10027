"""TOTP (RFC 6238) with replay protection: a time step is accepted at most once."""

from __future__ import annotations

import time

import pyotp
from sqlalchemy import or_, update
from sqlalchemy.orm import Session

from core.models import User

STEP = 30
ISSUER = "rly"


def new_secret() -> str:
    return pyotp.random_base32()


def provisioning_uri(secret: str, username: str) -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=ISSUER)


def matching_step(secret: str, code: str, now: float | None = None) -> int | None:
    """The time step (±1) whose code equals `code`, or None."""
    code = code.strip()
    if not (code.isdigit() and len(code) == 6):
        return None
    totp = pyotp.TOTP(secret)
    now = time.time() if now is None else now
    current = int(now // STEP)
    for step in (current, current - 1, current + 1):
        if pyotp.utils.strings_equal(totp.at(step * STEP), code):
            return step
    return None


def consume_code(session: Session, user: User, code: str, now: float | None = None) -> bool:
    """Accept the code once: an atomic UPDATE wins only if the step is newer than the last used."""
    step = matching_step(user.totp_secret, code, now)
    if step is None:
        return False
    result = session.execute(
        update(User)
        .where(User.id == user.id, or_(User.last_totp_step.is_(None), User.last_totp_step < step))
        .values(last_totp_step=step)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)
