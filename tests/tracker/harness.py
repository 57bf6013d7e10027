"""A tracker on a real root app (as `rly serve` builds it), driven over ASGI by httpx.

env = TrackerEnv.create(tmp_path)
token = env.token(auto_accept=True)
async with env.client() as api:
    device = await api.enroll(token)
    reply = await device.checkin(wait=0)
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import httpx
from sqlalchemy import func, select

from core import db
from core.config import Settings, TrackerSettings
from core.devices import create_enroll_token
from core.hub import Hub
from core.models import Account, AuditEvent, Device, EnrollToken
from core.signing import sign_request
from rly.serve import Prepared, build_http_app, prepare


@dataclass
class TrackerEnv:
    prepared: Prepared
    hub: Hub
    app: Any
    account_id: int

    @classmethod
    def create(cls, data_dir: Path, *, database_url: str = "", **tracker: Any) -> TrackerEnv:
        settings = Settings(
            data_dir=data_dir,
            database_url=database_url,
            tracker=dataclasses.replace(TrackerSettings(), **tracker),
        )
        if database_url:
            db.upgrade(database_url)
        prepared = prepare(settings)
        hub = Hub()
        app = build_http_app(prepared, hub, {"tracker"})
        with prepared.sessions() as session, session.begin():
            account = Account(name=f"acme-{time.time_ns()}")
            session.add(account)
            session.flush()
            account_id = account.id
        return cls(prepared, hub, app, account_id)

    def close(self) -> None:
        self.prepared.engine.dispose()

    def token(self, *, auto_accept: bool = False, uses: int = 1, ttl: float = 3600) -> str:
        with self.prepared.sessions() as session, session.begin():
            return create_enroll_token(
                session,
                account_id=self.account_id,
                auto_accept=auto_accept,
                uses=uses,
                ttl=ttl,
                actor="test",
            )

    def device(self, device_id: str) -> Device:
        with self.prepared.sessions() as session:
            found = session.get(Device, device_id)
            assert found is not None
            return found

    def snapshot(self) -> dict[str, Any]:
        """Everything a refused request must leave as it was."""
        with self.prepared.sessions() as session:
            rows = session.execute(
                select(
                    Device.id,
                    Device.status,
                    Device.last_request_ms,
                    Device.last_checkin_at,
                    Device.tunnel_request,
                ).order_by(Device.id)
            ).all()
            return {
                "devices": [tuple(row) for row in rows],
                "uses": session.scalar(select(func.sum(EnrollToken.uses_left))),
                "audit": session.scalar(select(func.count(AuditEvent.id))),
            }

    @asynccontextmanager
    async def client(self) -> AsyncIterator[Api]:
        transport = httpx.ASGITransport(app=self.app, client=("192.0.2.7", 4321))
        async with httpx.AsyncClient(transport=transport, base_url="http://tracker") as http:
            yield Api(http)


@dataclass
class Api:
    http: httpx.AsyncClient

    async def post_enroll(self, token: str, key: asyncssh.SSHKey, **fields: Any) -> httpx.Response:
        body = {
            "token": token,
            "hostname": "appliance-1",
            "serial": "SN-1",
            "os_name": "Debian",
            "os_version": "12",
            "client_version": "0.1.0",
            "public_key": key.export_public_key().decode().strip(),
        } | fields
        return await self.http.post("/api/v1/enroll", json=body)

    async def enroll(self, token: str, **fields: Any) -> SignedDevice:
        key = asyncssh.generate_private_key("ssh-ed25519")
        response = await self.post_enroll(token, key, **fields)
        assert response.status_code == 200, response.text
        return SignedDevice(self.http, response.json()["device_id"], key, response.json())


@dataclass
class SignedDevice:
    """One enrolled device that signs its requests like rly-client does."""

    http: httpx.AsyncClient
    device_id: str
    key: asyncssh.SSHKey
    enrolled: dict[str, Any]
    last_ms: int = field(default=0)

    def stamp(self) -> int:
        self.last_ms = max(time.time_ns() // 1_000_000, self.last_ms + 1)
        return self.last_ms

    def body(self, *, wait: float = 0.0, **fields: Any) -> bytes:
        payload = {
            "device_id": self.device_id,
            "client_version": "0.1.1",
            "os_name": "Debian",
            "os_version": "12.5",
            "uptime": 1234.5,
            "tunnel": {"state": "down", "relay": None, "port": None, "since": None},
            "wait": wait,
        } | fields
        return json.dumps(payload).encode()

    def sign(
        self,
        body: bytes,
        *,
        path: str = "/api/v1/checkin",
        method: str = "POST",
        key: asyncssh.SSHKey | None = None,
        timestamp_ms: int | None = None,
    ) -> dict[str, str]:
        return sign_request(
            key=key or self.key,
            device_id=self.device_id,
            method=method,
            path=path,
            body=body,
            timestamp_ms=self.stamp() if timestamp_ms is None else timestamp_ms,
        )

    async def send(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        headers = headers | {"Content-Type": "application/json"}
        return await self.http.post("/api/v1/checkin", content=body, headers=headers)

    async def checkin(self, *, wait: float = 0.0) -> httpx.Response:
        body = self.body(wait=wait)
        return await self.send(body, self.sign(body))

    async def status(self, device_id: str | None = None) -> httpx.Response:
        path = f"/api/v1/devices/{device_id or self.device_id}"
        return await self.http.get(path, headers=self.sign(b"", path=path, method="GET"))
