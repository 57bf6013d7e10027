"""A device behind a web firewall: only an HTTP proxy (tinyproxy) gets out.

The real rly-client runs in a network namespace whose one way out is a
tinyproxy on the host end of a veth pair; the relay (`rly serve` with its own
TLS certificate) listens on the host's 127.0.0.1, which the namespace cannot
reach. A technician (real OpenSSH) gets a root shell through such a tunnel.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from sqlalchemy import select

from core.models import Tunnel
from tests.e2e.stack import wait_for
from tests.relay.test_technician_support import TechDb
from tests.support.procs import ManagedProcess
from tests.support.rly_server import RlyServer
from tests.support.technician import Technician
from tests.transport.support import Proxy, WebFirewall

CLIENT = (sys.executable, "-m", "device_client.cli")
URL_RE = r"https?://\S+/approve/([A-Za-z0-9_-]+)"


def token(server: RlyServer) -> str:
    out = server.run_cli("enroll-token", "create", "--account", "acme", "--auto-accept")
    match = re.search(r"^token (\S+)$", out.stdout, re.M)
    assert match, out.stdout + out.stderr
    return match.group(1)


def enroll(
    fw: WebFirewall, server: RlyServer, config: Path, *extra: str, name: str = "enroll"
) -> ManagedProcess:
    """`rly-client enroll` inside the namespace, pinning the relay's certificate file."""
    argv = [*CLIENT, "enroll", "--tracker", server.base_url, "--token", token(server)]
    argv += ["--config", str(config), "--target", "builtin", *extra]
    proc = fw.run(argv, name=name)
    proc.wait(30)
    return proc


def device_id(proc: ManagedProcess) -> str:
    match = re.search(r"enrolled: device (\S+),", proc.stdout)
    assert match, proc.output
    return match.group(1)


def open_tunnel(server: RlyServer, dev: str) -> Tunnel | None:
    db = TechDb(server.data_dir)
    try:
        return db.run(
            lambda s: s.scalar(
                select(Tunnel).where(Tunnel.device_id == dev, Tunnel.closed_at.is_(None))
            )
        )
    finally:
        db.close()


def run_client(fw: WebFirewall, config: Path, env: dict[str, str] | None = None) -> ManagedProcess:
    env = {"RLY_CLIENT_BACKOFF_CAP": "1", **(env or {})}
    return fw.run([*CLIENT, "run", "--config", str(config)], name="rly-client", env=env)


def root_shell(server: RlyServer, dev: str, transport: str | None = None) -> None:
    """ssh partner@relay, approve as alice, (`show` names the transport), connect DEV, uid 0."""
    db = TechDb(server.data_dir)
    tech = Technician(server.technician_port)
    try:
        db.decide(tech.expect(URL_RE, timeout=10).group(1), "alice")
        tech.expect(re.escape("rly:alice@acme> "), timeout=5)
        if transport is not None:
            tech.sendline(f"show {dev}")
            tech.expect(rf"Tunnel: relay .* over {re.escape(transport)}, ", timeout=5)
            tech.expect(re.escape("rly:alice@acme> "), timeout=5)
        tech.sendline(f"connect {dev}")
        tech.expect(r"[#$] $", timeout=15)
        tech.sendline("echo uid=$(id -u)")
        tech.expect("uid=0", timeout=5)
    finally:
        tech.close()
        db.close()


def https_only_proxy(fw: WebFirewall, server: RlyServer) -> Proxy:
    """A proxy with BasicAuth that CONNECTs only to the relay's HTTPS port."""
    return fw.proxy(user="dev", password="s3cret-proxy-pw", connect_ports=[server.http_port])


def test_https_only_proxy_falls_back_to_websocket_and_remembers_it(
    firewall: WebFirewall, tls_relay: RlyServer, tmp_path: Path
) -> None:
    """Through a password proxy that allows only 443-style CONNECTs the device enrolls, checks
    in, falls back to wss+connect by itself, serves a root shell (its data connection over a
    WebSocket too), and after a restart goes straight to the WebSocket endpoint; the proxy
    password is in no log."""
    proxy = https_only_proxy(firewall, tls_relay)
    config = tmp_path / "dev" / "client.toml"
    cert = Path(tls_relay.config["http"]["tls_cert"])
    proc = enroll(firewall, tls_relay, config, "--ca-file", str(cert), "--proxy", proxy.url())
    assert proc.returncode == 0, proc.output
    dev = device_id(proc)
    client = run_client(firewall, config)
    row = wait_for(lambda: open_tunnel(tls_relay, dev), 20, "tunnel through the proxy")
    assert row.transport == "wss+connect"
    client.wait_for_line(
        r"relay ssh://127\.0\.0\.1:\d+ failed: proxy \S+ refused CONNECT", 5, stream="stderr"
    )
    root_shell(tls_relay, dev, "wss+connect")
    # the session's data connection rode a WebSocket through the proxy as well
    client.wait_for_line(r"data connection up session=", 5, stream="stderr")
    listing = tls_relay.run_cli("device", "list", check=True).stdout
    assert re.search(rf"^{dev}\s+online \(wss\+connect\)", listing, re.M), listing
    state = json.loads(config.with_suffix(".state.json").read_text())
    assert state["last_endpoint"].startswith("wss://127.0.0.1:")
    assert state["checkin_result"] == "ok"

    client.stop()
    wait_for(lambda: open_tunnel(tls_relay, dev) is None, 10, "tunnel closed")
    again = run_client(firewall, config)
    again.wait_for_line(
        r"connected transport=wss\+connect \(last good, tried first\)", 15, stream="stderr"
    )
    time.sleep(0.5)  # any other attempt would have been started (and logged) by now
    assert " failed: " not in again.output, again.output
    for text in (client.output, again.output, proc.output, tls_relay.output):
        assert proxy.password not in text
    assert "s3cret" not in config.read_text() or config.stat().st_mode & 0o077 == 0


def test_plain_proxy_from_the_environment_carries_raw_ssh(
    firewall: WebFirewall, tls_relay: RlyServer, tmp_path: Path
) -> None:
    """HTTPS_PROXY alone (no config key) takes check-ins, the raw SSH tunnel and the session's
    data connection through CONNECT; the TLS pin by fingerprint needs no SSL_CERT_FILE."""
    proxy = firewall.proxy()
    env = {"HTTPS_PROXY": proxy.url()}
    config = tmp_path / "dev" / "client.toml"
    pin = re.search(r"rly: tls certificate (SHA256:\S+)", tls_relay.output)
    assert pin, tls_relay.output
    argv = [*CLIENT, "enroll", "--tracker", tls_relay.base_url, "--token", token(tls_relay)]
    argv += ["--config", str(config), "--target", "builtin", "--tracker-fingerprint", pin.group(1)]
    proc = firewall.run(argv, name="enroll", env=env)
    assert proc.wait(30) == 0, proc.output
    dev = device_id(proc)
    client = run_client(firewall, config, env)
    row = wait_for(lambda: open_tunnel(tls_relay, dev), 20, "tunnel through the proxy")
    assert row.transport == "ssh+connect"
    root_shell(tls_relay, dev, "ssh+connect")
    # the session's own data connection went through the same proxy
    client.wait_for_line(r"data connection up session=", 5, stream="stderr")


def test_wrong_proxy_password_is_one_clear_line_without_credentials(
    firewall: WebFirewall, tls_relay: RlyServer, tmp_path: Path
) -> None:
    """A proxy that refuses our password: enroll says so in one line and logs no credential."""
    proxy = https_only_proxy(firewall, tls_relay)
    cert = Path(tls_relay.config["http"]["tls_cert"])
    wrong = "not-the-pw-42"
    config = tmp_path / "dev" / "client.toml"
    proc = enroll(
        firewall, tls_relay, config, "--ca-file", str(cert), "--proxy", proxy.url(password=wrong)
    )
    assert proc.returncode == 2, proc.output
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.search(
        r"proxy http://\S+ refused: 40[17] .*check the proxy user and password", lines[0]
    )
    assert wrong not in proc.output and proxy.user + ":" not in proc.output
    assert not config.exists()
