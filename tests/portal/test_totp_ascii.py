"""TOTP codes are six ASCII digits: Unicode digits are a wrong code, refused like one."""

from __future__ import annotations

import time

import pyotp
import pytest
from sqlalchemy import select

from core import totp
from core.models import AuditEvent, PortalSession
from tests.portal.support import PortalEnv

FULL_WIDTH = {ord("0") + i: chr(0xFF10 + i) for i in range(10)}  # U+FF10..FF19
ARABIC_INDIC = {ord("0") + i: chr(0x0660 + i) for i in range(10)}  # U+0660..0669


@pytest.mark.parametrize("digits", [FULL_WIDTH, ARABIC_INDIC], ids=["full-width", "arabic-indic"])
def test_fresh_code_in_unicode_digits_is_refused_at_login(
    env: PortalEnv, digits: dict[int, str]
) -> None:
    """A fresh code typed in full-width (or Arabic-Indic) digits is a wrong code: 401, audited
    and counted like one; the same code in ASCII digits then logs in (its step was not used)."""
    alice = env.add_user("alice")
    client = env.client()
    code = alice.code()
    response = client.login("alice", alice.password, code.translate(digits))
    assert response.status_code == 401
    assert env.count(PortalSession) == 0
    with env.sessions() as s:
        reasons = s.scalars(
            select(AuditEvent.detail).where(AuditEvent.action == "portal.login_failed")
        )
        assert list(reasons) == ["reason=totp"]
    assert client.login("alice", alice.password, code).status_code == 303


def test_unicode_digits_never_match() -> None:
    """matching_step refuses every non-ASCII spelling of the current code."""
    secret = pyotp.random_base32()
    now = time.time()
    code = pyotp.TOTP(secret).at(now)
    assert totp.matching_step(secret, code, now) is not None
    for digits in (FULL_WIDTH, ARABIC_INDIC):
        assert totp.matching_step(secret, code.translate(digits), now) is None
    assert totp.matching_step(secret, f"{code}\n", now) is not None  # ASCII whitespace is trimmed
    assert totp.matching_step(secret, f"\u3000{code}", now) is None


def test_malformed_code_costs_as_much_as_a_wrong_one() -> None:
    """A malformed code (Unicode digits, a letter, empty, too long) is not refused faster than
    a wrong ASCII code: no early return before the comparisons."""
    secret = pyotp.random_base32()
    now = time.time()
    wrong = f"{(int(pyotp.TOTP(secret).at(now)) + 500_000) % 1_000_000:06d}"

    def cost(code: str) -> float:
        started = time.perf_counter()
        for _ in range(200):
            totp.matching_step(secret, code, now)
        return time.perf_counter() - started

    for malformed in (wrong.translate(FULL_WIDTH), wrong[:5] + "x", "", "1" * 64):
        ascii_runs, malformed_runs = [], []
        for _ in range(5):  # interleaved, best of five: robust to load from other processes
            ascii_runs.append(cost(wrong))
            malformed_runs.append(cost(malformed))
        assert min(malformed_runs) > 0.5 * min(ascii_runs), (malformed, ascii_runs, malformed_runs)
