"""Hypothesis fuzzing of the tracker's JSON bodies: every answer is 2xx or 4xx, never 5xx."""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.exceptions import StarletteDeprecationWarning

from core import accounts, devices
from core.config import Settings, TrackerSettings
from core.db import make_engine, make_sessions, upgrade
from core.hub import Hub
from core.keys import KeyStore
from core.models import Device
from core.signing import sign_request
from tracker.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
# Hostile but plausible values for known fields: wrong types, edges, control chars, huge numbers.
odd_text = st.text(max_size=300) | st.sampled_from(
    ["", "\x00", "a\nb", "\x1b[2J", "é" * 70, "x" * 300]
)
odd_number = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0, -1, 1e11, 1e11 + 1, 60, 60.0001, 65535, 65536])
)
odd_value = odd_text | odd_number | st.none() | st.booleans() | st.lists(scalars, max_size=2)


@dataclass
class Api:
    client: TestClient
    device_id: str
    key: asyncssh.SSHKey
    token: str
    last_ms: int = 0

    def post(self, path: str, body: bytes, signed: bool = False) -> int:
        headers = {"Content-Type": "application/json"}
        if signed:
            self.last_ms = max(time.time_ns() // 1_000_000, self.last_ms + 1)  # no replays
            headers |= sign_request(
                key=self.key,
                device_id=self.device_id,
                method="POST",
                path=path,
                body=body,
                timestamp_ms=self.last_ms,
            )
        return int(self.client.post(path, content=body, headers=headers).status_code)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    url = f"sqlite:///{tmp_path / 'rly.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessions(engine)
    key = asyncssh.generate_private_key("ssh-ed25519")
    with sessions() as s, s.begin():
        account = accounts.add_account(s, name="acme", actor="test")
        token = devices.create_enroll_token(
            s, account_id=account.id, auto_accept=True, uses=1000, ttl=3600, actor="test"
        )
        s.add(
            Device(
                id="fuzzdev01",
                account_id=account.id,
                hostname="fuzz",
                serial="",
                public_key=key.export_public_key().decode().strip(),
                key_fingerprint=key.get_fingerprint(),
                status="accepted",
            )
        )
    settings_ = dataclasses.replace(
        Settings(data_dir=tmp_path), tracker=TrackerSettings(checkin_wait=0.0)
    )
    keys = KeyStore.load_or_create(tmp_path, ["localhost"])
    app = create_app(settings_, sessions, Hub(), keys)
    with TestClient(app, base_url="http://t/api/v1", raise_server_exceptions=False) as client:
        yield Api(client, "fuzzdev01", key, token)
    engine.dispose()


def _ok(status: int) -> bool:
    return 200 <= status < 500


def _checkin(**override: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "device_id": "fuzzdev01",
        "client_version": "1.0",
        "os_name": "Linux",
        "os_version": "6",
        "uptime": 1.0,
        "tunnel": {"state": "down", "relay": None, "port": None, "since": None},
        "wait": 0.0,
    }
    body.update(override)
    return body


@FUZZ
@given(body=json_values)
def test_any_json_to_enroll_and_checkin(api: Api, body: Any) -> None:
    """Any JSON document sent to enroll or (signed) check-in gets a 2xx/4xx answer."""
    raw = json.dumps(body).encode()
    assert _ok(api.post("/api/v1/enroll", raw))
    assert _ok(api.post("/api/v1/checkin", raw, signed=True))


@FUZZ
@given(raw=st.binary(max_size=300))
def test_any_bytes_to_enroll_and_checkin(api: Api, raw: bytes) -> None:
    """Arbitrary bytes (invalid JSON, invalid UTF-8) get a 4xx, signed or not."""
    assert _ok(api.post("/api/v1/enroll", raw))
    assert _ok(api.post("/api/v1/checkin", raw, signed=True))


ENROLL_FIELDS = ["token", "hostname", "serial", "os_name", "os_version", "client_version"]


@FUZZ
@given(field=st.sampled_from([*ENROLL_FIELDS, "public_key", "target_host_key"]), value=odd_value)
def test_enroll_with_one_hostile_field(api: Api, field: str, value: Any) -> None:
    """A well-formed enrollment with one hostile field value is answered 2xx/4xx."""
    key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    body: dict[str, Any] = dict.fromkeys(ENROLL_FIELDS, "x") | {
        "token": api.token,
        "public_key": key,
    }
    body[field] = value
    assert _ok(api.post("/api/v1/enroll", json.dumps(body).encode()))


CHECKIN_FIELDS = ["device_id", "client_version", "os_name", "os_version", "uptime", "wait"]
TUNNEL_FIELDS = ["state", "relay", "port", "since"]


@FUZZ
@given(
    field=st.sampled_from(CHECKIN_FIELDS + [f"tunnel.{f}" for f in TUNNEL_FIELDS]),
    value=odd_value,
)
def test_signed_checkin_with_one_hostile_field(api: Api, field: str, value: Any) -> None:
    """A validly signed check-in with one hostile field value is answered 2xx/4xx."""
    body = _checkin()
    if field.startswith("tunnel."):
        body["tunnel"] = {**body["tunnel"], field.split(".", 1)[1]: value}
    else:
        body[field] = value
    assert _ok(api.post("/api/v1/checkin", json.dumps(body).encode(), signed=True))
