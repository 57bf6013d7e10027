"""Fixtures for the transport tests: a TLS relay, a web firewall (namespace + tinyproxy).

`tls_relay` (module): `rly serve` with its own self-signed certificate, account
acme and portal user alice. `firewall`: a fresh namespace for one test, its
processes, proxies, veth pair and namespace removed at teardown even when the
test fails.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.relay.test_technician_support import TechDb
from tests.support.rly_server import RlyServer
from tests.transport.support import WebFirewall, self_signed

TLS_AND_PROXY_VARIABLES = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "HTTPS_PROXY",
    "https_proxy",
    "NO_PROXY",
    "no_proxy",
)


@pytest.fixture(autouse=True)
def _no_tls_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Devices started here inherit no SSL_CERT_FILE/SSL_CERT_DIR: the pin must suffice."""
    for name in (
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "HTTPS_PROXY",
        "https_proxy",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tls_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RlyServer]:
    """`rly serve` on loopback with HTTPS from its own certificate (names 127.0.0.1)."""
    workdir = tmp_path_factory.mktemp("tls-relay")
    workdir.chmod(0o700)
    cert, key = self_signed(workdir, "relay-cert")
    server = RlyServer(
        workdir,
        config={
            "http": {"tls_cert": str(cert), "tls_key": str(key)},
            "relay": {"keepalive_interval": "2s", "keepalive_count": 2},
        },
    )
    server.start()
    try:
        server.run_cli("account", "add", "acme", check=True)
        db = TechDb(server.data_dir)
        db.add_user("alice", "acme")
        db.close()
        yield server
    finally:
        server.stop()


@pytest.fixture
def firewall(tmp_path: Path) -> Iterator[WebFirewall]:
    """A network namespace that reaches nothing but the proxies started on its host end."""
    if os.geteuid() != 0 or shutil.which("tinyproxy") is None:
        pytest.fail("the transport tests need root (ip netns) and tinyproxy (see .ci/run)")
    fw = WebFirewall.create(tmp_path)
    try:
        yield fw
    finally:
        print(fw.processes.report())  # shown by pytest only when the test failed
        fw.close()
