"""The lean `POST /checkin` answers exactly as the FastAPI route it shadows.

Each case is sent to two trackers built alike, one with the lean route and one
with it switched off, and must get the same status, the same body (bar the
server time) and leave the database the same.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from tests.tracker.harness import SignedDevice, TrackerEnv
from tracker import app as tracker_app
from tracker import checkin_route

Case = Callable[[SignedDevice], tuple[bytes, dict[str, str]]]


def _signed(body: bytes | None = None, **sign: Any) -> Case:
    def make(device: SignedDevice) -> tuple[bytes, dict[str, str]]:
        data = device.body() if body is None else body
        return data, device.sign(data, **sign) | {"Content-Type": "application/json"}

    return make


def _fields(**fields: Any) -> Case:
    def make(device: SignedDevice) -> tuple[bytes, dict[str, str]]:
        data = device.body(**fields)
        return data, device.sign(data) | {"Content-Type": "application/json"}

    return make


def _headers(content_type: str | None, body: bytes | None = None) -> Case:
    def make(device: SignedDevice) -> tuple[bytes, dict[str, str]]:
        data = device.body() if body is None else body
        headers = device.sign(data)
        if content_type is not None:
            headers["Content-Type"] = content_type
        return data, headers

    return make


def _unsigned(device: SignedDevice) -> tuple[bytes, dict[str, str]]:
    return device.body(), {"Content-Type": "application/json"}


def _stale(device: SignedDevice) -> tuple[bytes, dict[str, str]]:
    data = device.body()
    return data, device.sign(data, timestamp_ms=1) | {"Content-Type": "application/json"}


def _wrong_key(device: SignedDevice) -> tuple[bytes, dict[str, str]]:
    data = device.body()
    other = asyncssh.generate_private_key("ssh-ed25519")
    return data, device.sign(data, key=other) | {"Content-Type": "application/json"}


def _other_id(device: SignedDevice) -> tuple[bytes, dict[str, str]]:
    data = device.body(device_id="d" + device.device_id[1:][::-1])
    return data, device.sign(data) | {"Content-Type": "application/json"}


CASES: dict[str, Case] = {
    "ok": _signed(),
    "ok json+suffix": _headers("application/vnd.rly+json"),
    "ok charset": _headers("application/json; charset=utf-8"),
    "no content type": _headers(None),
    "text content type": _headers("text/plain"),
    "empty body": _signed(b""),
    "not json": _signed(b"{nope"),
    "not utf-8": _signed(b'{"a": "\xff\xfe"}'),
    "json list": _signed(b"[]"),
    "json null": _signed(b"null"),
    "NaN uptime": _signed(b'{"uptime": NaN}'),
    "missing field": _signed(json.dumps({"device_id": "x"}).encode()),
    "extra field": _fields(extra=1),
    "string uptime": _fields(uptime="12"),
    "negative uptime": _fields(uptime=-1),
    "huge wait": _fields(wait=1e9),
    "bool wait": _fields(wait=True),
    "control chars": _fields(os_name="a\x1bb"),
    "long version": _fields(client_version="v" * 65),
    "bad tunnel state": _fields(tunnel={"state": "sideways"}),
    "bad device id": _fields(device_id="../etc"),
    "other device id": _other_id,
    "unsigned": _unsigned,
    "stale stamp": _stale,
    "wrong key": _wrong_key,
    "wrong path signed": _signed(path="/api/v1/enroll"),
}


@pytest.fixture
def pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TrackerEnv, TrackerEnv]]:
    envs = (
        TrackerEnv.create(tmp_path / "lean"),
        _without_lean_route(tmp_path / "ref", monkeypatch),
    )
    yield envs
    for env in envs:
        env.close()


def _without_lean_route(path: Path, monkeypatch: pytest.MonkeyPatch) -> TrackerEnv:
    with monkeypatch.context() as patch:
        patch.setattr(tracker_app, "CheckinRoute", Passthrough)
        return TrackerEnv.create(path)


class Passthrough(checkin_route.CheckinRoute):
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        Passthrough.calls += 1
        await self.app(scope, receive, send)

    calls = 0


@pytest.mark.parametrize("name", list(CASES))
def test_same_answer_as_fastapi_route(name: str, pair: tuple[TrackerEnv, TrackerEnv]) -> None:
    async def one(env: TrackerEnv) -> tuple[int, dict[str, Any], dict[str, Any]]:
        async with env.client() as api:
            device = await api.enroll(env.token(auto_accept=True))
            assert (await device.checkin()).status_code == 200  # the key is cached now
            before = env.snapshot()
            body, headers = CASES[name](device)
            reply = await api.http.post("/api/v1/checkin", content=body, headers=headers)
            answer = reply.json()
            answer.pop("server_time", None)
            after = env.snapshot()
            if reply.status_code != 200:
                assert after == before, "a refused check-in changed the database"
            return reply.status_code, answer, {"changed": after != before}

    lean, ref = pair
    calls = Passthrough.calls
    got = asyncio.run(one(lean))
    assert Passthrough.calls == calls
    want = asyncio.run(one(ref))
    assert Passthrough.calls > calls  # the reference really went through FastAPI's route
    assert got == want
