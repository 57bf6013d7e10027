"""Device request signatures on the tracker side, with parsed keys cached per device.

An unknown device id is checked against a throw-away key, so answering
"unknown device" costs the same signature check as answering "bad signature".
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass

import asyncssh

from core.signing import SignatureError, verify_request
from tracker.errors import ApiError

MAX_CACHED_KEYS = 200_000


@dataclass(frozen=True)
class SignedRequest:
    """What a signature covers, as received."""

    headers: Mapping[str, str]
    method: str
    path: str
    body: bytes


class Verifier:
    def __init__(self, *, skew_seconds: float) -> None:
        self.skew_ms = int(skew_seconds * 1000)
        self._keys: dict[str, tuple[str, asyncssh.SSHKey]] = {}
        self._dummy = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()

    def _key(self, device_id: str, text: str) -> asyncssh.SSHKey:
        """The parsed key, re-parsed only when the stored key text changes."""
        cached = self._keys.get(device_id)
        if cached is not None and cached[0] == text:
            return cached[1]
        key = asyncssh.import_public_key(text)
        if len(self._keys) >= MAX_CACHED_KEYS:
            self._keys.clear()
        self._keys[device_id] = (text, key)
        return key

    def knows(self, device_id: str) -> bool:
        """A key is cached for this device (it checked in successfully before)."""
        return device_id in self._keys

    def verify_known(self, *, device_id: str, request: SignedRequest) -> tuple[str, int] | None:
        """(key text, stamp) if the request verifies with this device's cached key, else None.

        Replay is not checked here: the caller's write requires a newer stamp
        and that the key text is still the stored one. None means "take the
        full path", which answers any refusal precisely.
        """
        cached = self._keys.get(device_id)
        if cached is None:
            return None
        try:
            stamp = self._check(cached[1], None, time.time_ns() // 1_000_000, request)
        except SignatureError:
            return None
        return cached[0], stamp

    def verify(
        self, *, device_id: str, key_text: str | None, last_ms: int | None, request: SignedRequest
    ) -> int:
        """Return the accepted timestamp; raise ApiError 404 (unknown) or 401 (refused)."""
        now_ms = time.time_ns() // 1_000_000
        if key_text is None:
            with contextlib.suppress(SignatureError):
                self._check(self._dummy, None, now_ms, request)
            raise ApiError(404, "unknown device")
        try:
            key = self._key(device_id, key_text)
        except (asyncssh.KeyImportError, ValueError):
            raise ApiError(401, "bad signature") from None
        try:
            return self._check(key, last_ms, now_ms, request)
        except SignatureError as exc:
            raise ApiError(401, str(exc)) from None

    def _check(
        self, key: asyncssh.SSHKey, last_ms: int | None, now_ms: int, request: SignedRequest
    ) -> int:
        return verify_request(
            public_key=key,
            headers=request.headers,
            method=request.method,
            path=request.path,
            body=request.body,
            now_ms=now_ms,
            last_ms=last_ms,
            skew_ms=self.skew_ms,
        )
