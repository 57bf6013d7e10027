"""Validation of ids and names that devices, browsers and admins send."""

from __future__ import annotations

import re
import secrets
import unicodedata

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
USERNAME_RE = re.compile(r"[a-z][a-z0-9._-]{0,31}")
DEVICE_ID_RE = re.compile(r"[a-z0-9]{10}")
_ID_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i: read over the phone


class InvalidInput(ValueError):
    """A one-line message saying which field is wrong and why."""


def new_id(length: int = 10) -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def printable(value: str, *, field: str, max_length: int, allow_empty: bool = False) -> str:
    """Accept printable text without control characters, bounded in length."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string")
    value = value.strip()
    if not value and not allow_empty:
        raise InvalidInput(f"{field} must not be empty")
    if len(value) > max_length:
        raise InvalidInput(f"{field} is longer than {max_length} characters")
    if any(unicodedata.category(ch).startswith("C") for ch in value):
        raise InvalidInput(f"{field} contains control characters")
    return value


def matches(value: str, pattern: re.Pattern[str], *, field: str, hint: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidInput(f"{field} is invalid: {hint}")
    return value


def account_name(value: str) -> str:
    return matches(
        value, NAME_RE, field="account name", hint="letters, digits, '.', '_' or '-', at most 64"
    )


def username(value: str) -> str:
    return matches(
        value,
        USERNAME_RE,
        field="username",
        hint="lower-case letters, digits, '.', '_' or '-', starting with a letter",
    )


def device_id(value: str) -> str:
    return matches(value, DEVICE_ID_RE, field="device id", hint="10 lower-case letters or digits")


def strip_controls(value: str) -> str:
    """For display: drop control characters a device may have sent."""
    return "".join(ch for ch in value if not unicodedata.category(ch).startswith("C"))


def is_ascii_digits(value: str) -> bool:
    """True for a non-empty run of 0-9 only (str.isdigit and int() take other digits too)."""
    return value.isascii() and value.isdigit()
