"""`http.max_connections`: how many long-polling devices one tracker process holds at once.

Each held long poll is one open HTTP connection, so the cap sizes a tracker
for an on-demand fleet; past it a request gets 503 (the device retries), and
`rly serve` raises its open-files limit to match.
"""

from __future__ import annotations

import resource
import socket
import time
from pathlib import Path

import httpx
import pytest

from core.config import ConfigError, load_settings
from rly.http_server import raise_open_files_limit
from tests.support.rly_server import RlyFactory


@pytest.mark.parametrize("value", ["0", "1000001", "-5"])
def test_max_connections_out_of_range_is_one_line(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("RLY_HTTP_MAX_CONNECTIONS", value)
    with pytest.raises(ConfigError, match=r"http\.max_connections|RLY_HTTP_MAX_CONNECTIONS") as exc:
        load_settings()
    assert "\n" not in str(exc.value)


def test_default_holds_a_large_on_demand_fleet() -> None:
    assert load_settings().http.max_connections >= 16384


def test_open_files_limit_is_raised_up_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        got = raise_open_files_limit(hard + 10 if hard != resource.RLIM_INFINITY else 4096)
        assert got == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert got == (hard if hard != resource.RLIM_INFINITY else 4096)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _open(port: int) -> socket.socket:
    """A connection that sent half a request: it counts against the cap while it waits."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    return sock


def test_connections_beyond_the_cap_get_503(rly_factory: RlyFactory, tmp_path: Path) -> None:
    """With `http.max_connections = 4`, four held connections leave no room: the next request
    is answered 503 at once; when they close, requests are served again."""
    server = rly_factory(config={"http": {"max_connections": 4}})
    url = f"http://127.0.0.1:{server.http_port}/healthz"
    held = [_open(server.http_port) for _ in range(4)]
    try:
        time.sleep(0.3)
        assert httpx.get(url, timeout=5).status_code == 503
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while (status := httpx.get(url, timeout=5).status_code) != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status == 200
