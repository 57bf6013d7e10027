"""core.signing: the request signature contract between devices and the tracker."""

from __future__ import annotations

import asyncssh
import pytest

from core.signing import (
    HEADER_DEVICE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    SignatureError,
    canonical_request,
    sign_request,
    verify_request,
)

KEY = asyncssh.generate_private_key("ssh-ed25519")
NOW = 1_700_000_000_000
PATH = "/api/v1/checkin"
BODY = b'{"device_id":"dev-1"}'


def _signed(**overrides: object) -> dict[str, str]:
    args: dict[str, object] = {
        "key": KEY,
        "device_id": "dev-1",
        "method": "POST",
        "path": PATH,
        "body": BODY,
        "timestamp_ms": NOW,
    }
    args.update(overrides)
    return sign_request(**args)  # type: ignore[arg-type]


def _verify(headers: dict[str, str], **overrides: object) -> int:
    args: dict[str, object] = {
        "public_key": KEY,
        "headers": headers,
        "method": "POST",
        "path": PATH,
        "body": BODY,
        "now_ms": NOW,
        "last_ms": None,
    }
    args.update(overrides)
    return verify_request(**args)  # type: ignore[arg-type]


def test_canonical_bytes_match_the_documented_format() -> None:
    """The signed bytes are exactly the format in docs/architecture.md."""
    data = canonical_request(device_id="d", method="post", path="/p", timestamp_ms=5, body=b"")
    assert data == (
        b"rly-request-v1\nd\nPOST\n/p\n5\n"
        b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


def test_round_trip_returns_the_timestamp() -> None:
    """A correctly signed request verifies and yields its timestamp for last_ms."""
    headers = _signed()
    assert set(headers) == {HEADER_DEVICE, HEADER_TIMESTAMP, HEADER_SIGNATURE}
    assert _verify(headers) == NOW


def test_headers_are_found_case_insensitively() -> None:
    """Lower-cased header names (as HTTP servers may present them) still verify."""
    headers = {name.lower(): value for name, value in _signed().items()}
    assert _verify(headers) == NOW


def test_public_key_alone_verifies() -> None:
    """The tracker holds only the public key, and that is enough to verify."""
    public = asyncssh.import_public_key(KEY.export_public_key())
    assert _verify(_signed(), public_key=public) == NOW


@pytest.mark.parametrize("last_ms", [NOW, NOW + 1])
def test_replay_is_rejected(last_ms: int) -> None:
    """A timestamp not greater than the last accepted one is a replay."""
    with pytest.raises(SignatureError, match=r"^replayed request$"):
        _verify(_signed(), last_ms=last_ms)


def test_later_request_after_last_is_accepted() -> None:
    """A timestamp just above the last accepted one passes."""
    assert _verify(_signed(), last_ms=NOW - 1) == NOW


@pytest.mark.parametrize("offset", [300_001, -300_001])
def test_timestamp_outside_window_is_rejected(offset: int) -> None:
    """Timestamps more than five minutes from the server clock are refused."""
    with pytest.raises(SignatureError, match=r"^timestamp outside the allowed window$"):
        _verify(_signed(timestamp_ms=NOW + offset))


def test_timestamp_at_window_edge_is_accepted() -> None:
    """Exactly five minutes of skew is still inside the window."""
    assert _verify(_signed(timestamp_ms=NOW - 300_000)) == NOW - 300_000


@pytest.mark.parametrize("field", ["method", "path", "body", "device"])
def test_tampering_breaks_the_signature(field: str) -> None:
    """Changing the method, path, body or device id invalidates the signature."""
    headers = _signed()
    overrides: dict[str, object] = {"method": "GET", "path": "/api/v1/enroll", "body": BODY + b" "}
    if field == "device":
        headers[HEADER_DEVICE] = "dev-2"
        overrides = {}
    else:
        overrides = {field: overrides[field]}
    with pytest.raises(SignatureError, match=r"^bad signature$"):
        _verify(headers, **overrides)


def test_other_key_is_rejected() -> None:
    """A signature by another key does not verify."""
    other = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(SignatureError, match=r"^bad signature$"):
        _verify(_signed(key=other))


@pytest.mark.parametrize("garbage", ["not base64!", "AAAA", ""])
def test_malformed_signature_is_bad_or_missing(garbage: str) -> None:
    """Garbage or empty signatures are refused with a one-line reason, never an exception."""
    headers = _signed()
    headers[HEADER_SIGNATURE] = garbage
    with pytest.raises(SignatureError, match=r"^(bad signature|missing signature headers)$"):
        _verify(headers)


@pytest.mark.parametrize("header", [HEADER_DEVICE, HEADER_TIMESTAMP, HEADER_SIGNATURE])
def test_missing_header_is_reported(header: str) -> None:
    """A request without one of the three headers is refused as unsigned."""
    headers = _signed()
    del headers[header]
    with pytest.raises(SignatureError, match=r"^missing signature headers$"):
        _verify(headers)


def test_non_numeric_timestamp_is_rejected() -> None:
    """A timestamp that is not an integer never reaches the signature check."""
    headers = _signed()
    headers[HEADER_TIMESTAMP] = "1e12"
    with pytest.raises(SignatureError, match=r"^timestamp outside the allowed window$"):
        _verify(headers)
