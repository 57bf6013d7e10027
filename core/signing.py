"""Device request signatures: the contract between rly-client and the tracker.

Imports only the stdlib and asyncssh because it runs on appliances too.
The signed bytes bind the device, method, path, time and body, so a captured
request can be neither altered nor replayed (the tracker keeps the last
accepted timestamp per device and requires strictly increasing ones).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Mapping

import asyncssh

HEADER_DEVICE = "X-Rly-Device"
HEADER_TIMESTAMP = "X-Rly-Timestamp"
HEADER_SIGNATURE = "X-Rly-Signature"
SIGNATURE_HEADERS = (HEADER_DEVICE, HEADER_TIMESTAMP, HEADER_SIGNATURE)

SIG_ALGORITHM = b"ssh-ed25519"
DEFAULT_SKEW_MS = 300_000
_PREFIX = "rly-request-v1"


class SignatureError(Exception):
    """A request signature was refused; str(exc) is a one-line reason."""


def canonical_request(
    *, device_id: str, method: str, path: str, timestamp_ms: int, body: bytes
) -> bytes:
    """Return the exact bytes that are signed (see docs/architecture.md)."""
    digest = hashlib.sha256(body).hexdigest()
    text = f"{_PREFIX}\n{device_id}\n{method.upper()}\n{path}\n{timestamp_ms}\n{digest}"
    return text.encode("utf-8")


def sign_request(
    *,
    key: asyncssh.SSHKey,
    device_id: str,
    method: str,
    path: str,
    body: bytes,
    timestamp_ms: int | None = None,
) -> dict[str, str]:
    """Sign one request with the device key and return the headers to send."""
    if timestamp_ms is None:
        timestamp_ms = time.time_ns() // 1_000_000
    data = canonical_request(
        device_id=device_id, method=method, path=path, timestamp_ms=timestamp_ms, body=body
    )
    signature = key.sign(data, SIG_ALGORITHM)
    return {
        HEADER_DEVICE: device_id,
        HEADER_TIMESTAMP: str(timestamp_ms),
        HEADER_SIGNATURE: base64.b64encode(signature).decode("ascii"),
    }


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Look a header up case-insensitively (plain dicts are case-sensitive)."""
    value = headers.get(name)
    if value is not None:
        return value
    wanted = name.lower()
    for key, candidate in headers.items():
        if key.lower() == wanted:
            return candidate
    return None


def verify_request(
    *,
    public_key: asyncssh.SSHKey,
    headers: Mapping[str, str],
    method: str,
    path: str,
    body: bytes,
    now_ms: int,
    last_ms: int | None,
    skew_ms: int = DEFAULT_SKEW_MS,
) -> int:
    """Check a signed request and return its timestamp (store it as last_ms).

    Raises SignatureError with one of: "missing signature headers",
    "timestamp outside the allowed window", "replayed request", "bad signature".
    """
    device_id, stamp, signature = (_header(headers, name) for name in SIGNATURE_HEADERS)
    if not device_id or not stamp or not signature:
        raise SignatureError("missing signature headers")
    if not stamp.isascii() or not stamp.isdigit():
        raise SignatureError("timestamp outside the allowed window")
    timestamp_ms = int(stamp)
    if abs(now_ms - timestamp_ms) > skew_ms:
        raise SignatureError("timestamp outside the allowed window")
    if last_ms is not None and timestamp_ms <= last_ms:
        raise SignatureError("replayed request")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("bad signature") from None
    data = canonical_request(
        device_id=device_id, method=method, path=path, timestamp_ms=timestamp_ms, body=body
    )
    try:
        # convert_to_public(): a private SSHKey cannot verify (asyncssh raises)
        valid = public_key.convert_to_public().verify(data, raw)
    except (ValueError, asyncssh.Error):
        valid = False
    if not valid:
        raise SignatureError("bad signature")
    return timestamp_ms
