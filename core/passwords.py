"""Password hashing (argon2id) with equal time whether or not the user exists."""

from __future__ import annotations

import functools

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()
MIN_LENGTH = 10


@functools.cache
def _dummy_hash() -> str:
    """Made on first use: hashing costs ~0.3 s, which start-up should not pay."""
    return _hasher.hash("rly-dummy-password-for-timing")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Verify; with no hash (unknown user) still spend the same time on a dummy."""
    try:
        return (
            _hasher.verify(password_hash or _dummy_hash(), password) and password_hash is not None
        )
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
