"""TOTP (RFC 6238) with replay protection: a time step is accepted at most once.

A code is six ASCII digits; anything else (full-width digits too) is a wrong code.
"""

from __future__ import annotations

import hmac
import re
import time

import pyotp
from sqlalchemy import or_, update
from sqlalchemy.orm import Session

from core.models import User

STEP = 30
DIGITS = 6
CODE_RE = re.compile(r"[0-9]{6}")  # ASCII only: \d would match any Unicode digit
ISSUER = "rly"


def new_secret() -> str:
    return pyotp.random_base32()


def provisioning_uri(secret: str, username: str) -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=ISSUER)


def matching_step(secret: str, code: str, now: float | None = None) -> int | None:
    """The time step (±1) whose code equals `code`, or None.

    Only six ASCII digits can match: `str.isdigit` and pyotp's `strings_equal`
    (NFKC) would take full-width or other Unicode digits for ASCII ones. Any
    other input is a wrong code and costs the same three comparisons as one.
    """
    code = code.strip(" \t\r\n")
    wellformed = CODE_RE.fullmatch(code) is not None
    candidate = code.encode("ascii") if wellformed else b"-" * DIGITS
    totp = pyotp.TOTP(secret)
    now = time.time() if now is None else now
    current = int(now // STEP)
    found: int | None = None
    for step in (current, current - 1, current + 1):
        if hmac.compare_digest(totp.at(step * STEP).encode("ascii"), candidate) and found is None:
            found = step
    return found if wellformed else None


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
