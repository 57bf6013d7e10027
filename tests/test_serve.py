"""`rly serve` on a fresh data dir: start-up, keys, health, shutdown, and refusals."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncssh
import httpx
import pytest

from core.config import Settings, with_bound_http_port
from tests.support.rly_server import RlyFactory, RlyServer
from tests.support.technician import TechnicianFactory

ENV_PORTS = {
    "RLY_HTTP_PORT": "0",
    "RLY_RELAY_TECHNICIAN_PORT": "0",
    "RLY_RELAY_DEVICE_PORTS": "0",
    "RLY_HTTP_LISTEN": "127.0.0.1",
    "RLY_RELAY_LISTEN": "127.0.0.1",
}


def run_rly(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RLY_")}
    return subprocess.run(
        [sys.executable, "-m", "rly", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, **(env or {})},
        check=False,
    )


async def verified_by_ca(port: int, ca_public: str) -> bool:
    """True if the server proves a host certificate signed by ca_public (login itself may fail)."""
    trusted_ca = asyncssh.import_public_key(ca_public)
    try:
        async with asyncssh.connect(
            "127.0.0.1",
            port,
            username="nobody",
            known_hosts=([], [trusted_ca], []),
            client_keys=[asyncssh.generate_private_key("ssh-ed25519")],
            kbdint_auth=False,
            password_auth=False,
        ):
            return True
    except asyncssh.PermissionDenied:
        return True  # host verification passed; only the login was refused
    except asyncssh.HostKeyNotVerifiable:
        return False


def test_first_start_creates_keys_and_database_and_listens(rly_factory: RlyFactory) -> None:
    """A fresh data dir gets keys (0600 in 0700) and a database; all ports answer within 5 s."""
    started = time.monotonic()
    server = rly_factory().start()
    assert time.monotonic() - started < 5
    keys = server.data_dir / "keys"
    assert oct(keys.stat().st_mode & 0o777) == "0o700"
    for name in ("host_ca", "host_key", "user_ca"):
        assert oct((keys / name).stat().st_mode & 0o777) == "0o600"
    assert (server.data_dir / "rly.sqlite3").exists()
    assert oct((server.data_dir / "rly.sqlite3").stat().st_mode & 0o777) == "0o600"
    assert httpx.get(f"{server.base_url}/healthz").json() == {"status": "ok"}
    ca = (keys / "host_ca.pub").read_text()
    for port in (server.technician_port, *server.device_ports):
        assert asyncio.run(verified_by_ca(port, ca)), f"port {port} did not show the host cert"


def test_restart_keeps_the_host_key(rly_factory: RlyFactory) -> None:
    """The host key fingerprint survives a restart (keys are reused, not regenerated)."""
    server = rly_factory().start()
    before = (server.data_dir / "keys" / "host_key.pub").read_text()
    server.restart()
    after = (server.data_dir / "keys" / "host_key.pub").read_text()
    assert before == after
    fingerprint = asyncssh.import_public_key(after).get_fingerprint()
    probe = asyncio.run(asyncssh.get_server_host_key("127.0.0.1", server.technician_port))
    assert probe is not None and probe.get_fingerprint() == fingerprint


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_shuts_down_cleanly(rly_factory: RlyFactory, sig: signal.Signals) -> None:
    """SIGTERM and SIGINT stop the server with exit 0 and no traceback."""
    server = rly_factory().start()
    assert server.process is not None
    server.process.send_signal(sig)
    assert server.process.wait(10) == 0
    assert "Traceback" not in server.process.stderr


def test_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A taken port stops start-up with one line naming it and exit code 2."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**ENV_PORTS, "RLY_HTTP_PORT": str(port)}
        result = run_rly("serve", "--data-dir", str(tmp_path / "d"), env=env)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert f"127.0.0.1:{port}" in result.stderr and "http.port" in result.stderr
    busy_ssh = socket.socket()
    busy_ssh.bind(("127.0.0.1", 0))
    busy_ssh.listen()
    try:
        env = {**ENV_PORTS, "RLY_RELAY_TECHNICIAN_PORT": str(busy_ssh.getsockname()[1])}
        result = run_rly("serve", "--data-dir", str(tmp_path / "d"), env=env)
    finally:
        busy_ssh.close()
    assert result.returncode == 2
    assert "cannot listen for SSH" in result.stderr and result.stderr.strip().count("\n") == 0


def test_unreachable_database_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A database that does not answer stops start-up with one line and exit 2, no traceback."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    env = {
        **ENV_PORTS,
        "RLY_DATABASE_URL": f"postgresql+psycopg://postgres:hunter2@127.0.0.1:{dead_port}/x",
    }
    result = run_rly("serve", "--data-dir", str(tmp_path / "d"), env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0]
    assert "hunter2" not in result.stderr  # the password in the URL is not printed


def test_unknown_config_key_is_refused_and_nothing_created(tmp_path: Path) -> None:
    """An unknown key names itself; no data dir, key or database is created."""
    config = tmp_path / "rly.toml"
    config.write_text(f'data_dir = "{tmp_path / "d"}"\n[relay]\ntechnician_prot = 22\n')
    result = run_rly("serve", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == "rly: Config 'relay.technician_prot' is not a known key"
    assert not (tmp_path / "d").exists()


def test_bad_port_value_is_refused(tmp_path: Path) -> None:
    """A port outside 0-65535 is refused with one line naming the key."""
    result = run_rly("serve", "--data-dir", str(tmp_path / "d"), env={"RLY_HTTP_PORT": "65536"})
    assert result.returncode == 2
    assert "'RLY_HTTP_PORT'" in result.stderr and result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "d").exists()


def test_too_open_key_file_is_refused_by_name(rly_factory: RlyFactory) -> None:
    """A group-readable private key stops start-up, naming the file, and is left as it was."""
    server = rly_factory().start()
    server.stop()
    key = server.data_dir / "keys" / "user_ca"
    key.chmod(0o640)
    content = key.read_bytes()
    result = run_rly("serve", "--config", str(server.config_path))
    assert result.returncode == 2
    assert str(key) in result.stderr and result.stderr.strip().count("\n") == 0
    assert key.read_bytes() == content and (key.stat().st_mode & 0o777) == 0o640


def test_only_tracker_runs_http_without_ssh(rly_factory: RlyFactory) -> None:
    """`--only tracker` serves HTTP, opens no SSH port and announces no portal it lacks."""
    server: RlyServer = rly_factory(only="tracker").start()
    assert server.device_ports == []
    assert httpx.get(f"{server.base_url}/healthz").status_code == 200
    assert f"rly: tracker http://127.0.0.1:{server.http_port}/api/v1" in server.output
    assert "rly: portal" not in server.output
    assert httpx.get(f"{server.base_url}/login").status_code == 404


def test_port_zero_approval_urls_name_the_bound_port(
    rly_factory: RlyFactory, technician_factory: TechnicianFactory
) -> None:
    """With http.port = 0 and the default public URL, approval links use the port bound."""
    server = rly_factory()
    base = f"http://localhost:{server.http_port}"
    assert f"(public URL {base})" in server.output
    tech = technician_factory(server.technician_port)
    url = tech.expect(r"(http://\S+/approve/[A-Za-z0-9_-]+)").group(1)
    assert url.startswith(f"{base}/approve/")


def test_only_the_default_public_url_follows_the_port() -> None:
    """A public URL the operator set is kept; the default one names the served port."""
    default = Settings()
    assert with_bound_http_port(default, 9000).http.public_url == "http://localhost:9000"
    assert with_bound_http_port(default, 0).http.public_url == "http://localhost:8000"
    behind_proxy = dataclasses.replace(
        default, http=dataclasses.replace(default.http, public_url="https://rly.example")
    )
    assert with_bound_http_port(behind_proxy, 9000).http.public_url == "https://rly.example"


def test_metrics_are_prometheus_text(rly_factory: RlyFactory) -> None:
    """/metrics answers in the Prometheus text format with the database gauges."""
    server = rly_factory().start()
    body = httpx.get(f"{server.base_url}/metrics").text
    assert "# TYPE rly_checkins_total counter" in body
    assert "rly_tunnels_open 0" in body
    assert "rly_database_up 1" in body


def test_unmigrated_postgres_is_refused_then_served_after_upgrade(
    tmp_path: Path, pg_url: str, rly_factory: RlyFactory
) -> None:
    """PostgreSQL: serve refuses an unmigrated schema in one line; after `db upgrade` it serves."""
    from sqlalchemy import create_engine, text

    engine = create_engine(pg_url)
    with engine.begin() as conn:  # the shared pg_url database may hold other tests' schema
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    env = {**ENV_PORTS, "RLY_DATABASE_URL": pg_url}
    refused = run_rly("serve", "--data-dir", str(tmp_path / "d"), env=env)
    assert refused.returncode == 2
    assert "database has no schema yet, this rly needs" in refused.stderr
    assert "run 'rly db upgrade' first" in refused.stderr
    assert refused.stderr.strip().count("\n") == 0
    upgraded = run_rly("db", "upgrade", "--data-dir", str(tmp_path / "d"), env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.startswith("rly: applied migrations 0001, 0002"), upgraded.stdout
    assert "up to date" not in upgraded.stdout
    again = run_rly("db", "upgrade", "--data-dir", str(tmp_path / "d"), env=env)
    assert again.stdout.startswith("rly: database is up to date (schema 0"), again.stdout
    server = rly_factory(database_url=pg_url).start()
    assert httpx.get(f"{server.base_url}/healthz").json() == {"status": "ok"}


def test_unreadable_key_file_is_refused_by_name(rly_factory: RlyFactory) -> None:
    """A key file that is not a readable private key stops start-up, naming it, left as it was."""
    server = rly_factory().start()
    server.stop()
    key = server.data_dir / "keys" / "host_ca"
    key.write_bytes(b"not a key\n")
    result = run_rly("serve", "--config", str(server.config_path))
    assert result.returncode == 2
    assert str(key) in result.stderr
    assert "cannot be read" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert key.read_bytes() == b"not a key\n"
