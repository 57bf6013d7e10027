"""HTTP client for the tracker API (/api/v1): enroll, signed check-in and status.

Replies are checked field by field so that a tracker bug shows up as one clear
error line instead of a KeyError deep in the run loop.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import asyncssh
import httpx

from core.signing import sign_request
from device_client.placement import Relays, parse_relays
from device_client.proxy import AUTH_HINT, AUTH_REFUSED, choose_proxy
from device_client.tls import TlsTrust, client_context

LONG_POLL_SLACK = 10.0  # seconds of HTTP timeout on top of the long-poll wait
REQUEST_TIMEOUT = 20.0
MAX_DIALS = 8  # dial requests taken from one check-in answer


class TrackerError(Exception):
    """The tracker could not be reached or refused a request (one line)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class EnrollReply:
    """What the tracker tells a newly enrolled device."""

    device_id: str
    status: str
    relay_hosts: list[str]
    relay_ports: list[int]
    relay_host_ca: str
    user_ca: str
    login_user: str
    tunnel_mode: str
    checkin_interval: float


@dataclass(frozen=True)
class CheckinReply:
    """The tracker's answer to a check-in: the device status and what to do."""

    status: str
    action: str
    tunnel_mode: str
    next_checkin: float
    server_time: float
    action_id: int | None = None  # None: a tracker without acks (nothing to echo)
    relays: Relays | None = None  # None: a tracker without placement (keep the list)
    dials: tuple[Any, ...] = ()  # data-connection requests (core.data_wire), checked when used


def _field(data: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TrackerError(f"tracker sent a malformed reply: bad or missing '{key}'")
    return value


def parse_enroll(data: dict[str, Any]) -> EnrollReply:
    """Check an enroll reply; raise TrackerError naming the first bad field."""
    hosts = _field(data, "relay_hosts", list)
    ports = _field(data, "relay_ports", list)
    if not hosts or not all(isinstance(h, str) for h in hosts):
        raise TrackerError("tracker sent a malformed reply: bad or missing 'relay_hosts'")
    if not ports or not all(isinstance(p, int) and not isinstance(p, bool) for p in ports):
        raise TrackerError("tracker sent a malformed reply: bad or missing 'relay_ports'")
    return EnrollReply(
        device_id=_field(data, "device_id", str),
        status=_field(data, "status", str),
        relay_hosts=hosts,
        relay_ports=ports,
        relay_host_ca=_field(data, "relay_host_ca", str),
        user_ca=_field(data, "user_ca", str),
        login_user=_field(data, "login_user", str),
        tunnel_mode=_field(data, "tunnel_mode", str),
        checkin_interval=float(_field(data, "checkin_interval", (int, float))),
    )


def parse_checkin(data: dict[str, Any]) -> CheckinReply:
    """Check a check-in reply; raise TrackerError naming the first bad field."""
    return CheckinReply(
        status=_field(data, "status", str),
        action=_field(data, "action", str),
        tunnel_mode=_field(data, "tunnel_mode", str),
        next_checkin=float(_field(data, "next_checkin", (int, float))),
        server_time=float(_field(data, "server_time", (int, float))),
        action_id=_field(data, "action_id", int) if "action_id" in data else None,
        relays=parse_relays(data.get("relays")),
        dials=tuple(data["dials"][:MAX_DIALS]) if isinstance(data.get("dials"), list) else (),
    )


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, str) and error:
        return f"tracker refused the request ({response.status_code}): {error.splitlines()[0]}"
    return f"tracker refused the request (HTTP {response.status_code})"


class TrackerClient:
    """One tracker, optionally with a device identity for signed requests."""

    def __init__(
        self,
        base_url: str,
        *,
        device_id: str | None = None,
        key: asyncssh.SSHKey | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        proxy: str = "",
        trust: TlsTrust | None = None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._device_id = device_id
        self._key = key
        self._last_ms = 0
        # the same proxy choice and TLS pin as the tunnel; nothing read from the environment
        # behind our back (no SSL_CERT_FILE, no second reading of HTTPS_PROXY/NO_PROXY)
        host = httpx.URL(self._base).host
        via = self._proxy = choose_proxy(proxy, host)
        self._http = httpx.AsyncClient(
            transport=transport,
            timeout=REQUEST_TIMEOUT,
            verify=client_context(trust or TlsTrust()),
            proxy=via.url_with_credentials() if via else None,
            trust_env=False,
        )

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> TrackerClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    def _next_timestamp(self) -> int:
        """Strictly increasing milliseconds: the tracker rejects repeats as replays."""
        self._last_ms = max(time.time_ns() // 1_000_000, self._last_ms + 1)
        return self._last_ms

    async def _request(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | None,
        *,
        signed: bool,
        timeout: float = REQUEST_TIMEOUT,
    ) -> dict[str, Any]:
        url = httpx.URL(self._base + path)
        body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        if signed:
            if self._key is None or self._device_id is None:
                raise TrackerError("signed request without a device identity")
            headers |= sign_request(
                key=self._key,
                device_id=self._device_id,
                method=method,
                path=url.path,
                body=body,
                timestamp_ms=self._next_timestamp(),
            )
        try:
            response = await self._http.request(
                method, url, content=body, headers=headers, timeout=timeout
            )
        except httpx.ProxyError as exc:
            why = str(exc).strip() or type(exc).__name__
            hint = AUTH_HINT if why.split(" ", 1)[0] in AUTH_REFUSED else ""
            raise TrackerError(
                f"tracker {self._base} unreachable: proxy {self._proxy} refused: {why}{hint}"
            ) from None
        except httpx.HTTPError as exc:
            raise TrackerError(
                f"tracker {self._base} unreachable: {exc.__class__.__name__}: {exc}".rstrip(": ")
            ) from None
        if response.status_code >= 400:
            raise TrackerError(_error_text(response), response.status_code)
        try:
            data = response.json()
        except ValueError:
            raise TrackerError("tracker sent a reply that is not JSON") from None
        if not isinstance(data, dict):
            raise TrackerError("tracker sent a reply that is not a JSON object")
        return data

    async def enroll(self, body: dict[str, Any]) -> EnrollReply:
        """POST /api/v1/enroll (unsigned: the token is the credential)."""
        return parse_enroll(await self._request("POST", "/api/v1/enroll", body, signed=False))

    async def checkin(self, body: dict[str, Any]) -> CheckinReply:
        """POST /api/v1/checkin, long-polling for up to body['wait'] seconds."""
        wait = float(body.get("wait", 0.0))
        data = await self._request(
            "POST", "/api/v1/checkin", body, signed=True, timeout=wait + LONG_POLL_SLACK
        )
        return parse_checkin(data)

    async def device_status(self) -> dict[str, Any]:
        """GET /api/v1/devices/{id}: the tracker's view of this device."""
        return await self._request("GET", f"/api/v1/devices/{self._device_id}", None, signed=True)
