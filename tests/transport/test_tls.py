"""TLS trust without environment variables: a pinned CA file or fingerprint, one-line refusals.

The relay (`tls_relay`) serves HTTPS with its own self-signed certificate; the
devices here run on loopback (no proxy) with no SSL_CERT_FILE anywhere.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from core.tls_identity import file_fingerprint
from tests.e2e.stack import wait_for
from tests.support.procs import ProcessFactory
from tests.support.rly_server import RlyServer
from tests.transport.support import self_signed
from tests.transport.test_proxy import open_tunnel, token

CLIENT = (sys.executable, "-m", "device_client.cli")


def enroll(
    processes: ProcessFactory, server: RlyServer, config: Path, *pin: str
) -> tuple[int, str, str]:
    argv = [*CLIENT, "enroll", "--tracker", server.base_url, "--token", token(server)]
    proc = processes([*argv, "--config", str(config), "--target", "builtin", *pin], name="enroll")
    code = proc.wait(30)
    return code, proc.stdout, proc.stderr


def test_rly_serve_prints_the_fingerprint_devices_pin(tls_relay: RlyServer) -> None:
    """`rly serve` with its own certificate announces the SHA-256 fingerprint to pin."""
    expected = file_fingerprint(Path(tls_relay.config["http"]["tls_cert"]))
    assert f"rly: tls certificate {expected}" in tls_relay.output


def test_enroll_token_prints_the_pinned_enroll_command(tls_relay: RlyServer) -> None:
    """`rly enroll-token create` pins --tracker-fingerprint in the install command under TLS."""
    out = tls_relay.run_cli("enroll-token", "create", "--account", "acme", check=True).stdout
    expected = file_fingerprint(Path(tls_relay.config["http"]["tls_cert"]))
    assert f"--tracker-fingerprint {expected}" in out, out


def test_system_store_refuses_a_private_certificate_in_one_line(
    process_factory: ProcessFactory, tls_relay: RlyServer, tmp_path: Path
) -> None:
    """Without a pin the system CA store applies: a self-signed relay is refused, one line."""
    code, _out, err = enroll(process_factory, tls_relay, tmp_path / "c.toml")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "CERTIFICATE_VERIFY_FAILED" in err or "certificate verify failed" in err


@pytest.mark.parametrize("pin_kind", ["fingerprint", "ca-file"])
def test_a_certificate_other_than_the_pinned_one_is_refused_naming_both(
    process_factory: ProcessFactory, tls_relay: RlyServer, tmp_path: Path, pin_kind: str
) -> None:
    """A relay presenting another certificate than the pinned one: one line, both fingerprints."""
    other, _key = self_signed(tmp_path, "other-cert")
    pinned = file_fingerprint(other)
    presented = file_fingerprint(Path(tls_relay.config["http"]["tls_cert"]))
    pin = (
        ["--tracker-fingerprint", pinned]
        if pin_kind == "fingerprint"
        else ["--ca-file", str(other)]
    )
    config = tmp_path / "c.toml"
    code, _out, err = enroll(process_factory, tls_relay, config, *pin)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert f"presented {presented}" in lines[0] and pinned in lines[0], lines[0]
    assert not config.exists()


def test_pinned_ca_file_is_copied_and_used_by_run_and_status(
    process_factory: ProcessFactory, tls_relay: RlyServer, tmp_path: Path
) -> None:
    """--ca-file is copied beside the config (0600) and run/status use it with no variable;
    the tunnel then also works over wss with the same pin."""
    cert = Path(tls_relay.config["http"]["tls_cert"])
    config = tmp_path / "dev" / "client.toml"
    code, out, err = enroll(process_factory, tls_relay, config, "--ca-file", str(cert))
    assert code == 0, out + err
    copy = config.with_suffix(".tracker-ca.pem")
    assert copy.read_bytes() == cert.read_bytes() and copy.stat().st_mode & 0o777 == 0o600
    assert str(copy) in config.read_text()
    match = re.search(r"enrolled: device (\S+),", out)
    assert match
    dev = match.group(1)
    base = tls_relay.base_url.replace("https://", "wss://")
    text = config.read_text() + f'relay_endpoints = ["{base}/api/v1/tunnel"]\n'
    config.write_text(text)
    process_factory([*CLIENT, "run", "--config", str(config)], name="run")
    row = wait_for(lambda: open_tunnel(tls_relay, dev), 20, "wss tunnel")
    assert row.transport == "wss"
    status = process_factory([*CLIENT, "status", "--tracker", "--config", str(config)], name="st")
    assert status.wait(30) == 0, status.output
    assert "status:        accepted (tracker, now)" in status.stdout
    assert re.search(r"tunnel:        up via 127\.0\.0\.1:\d+ over wss since", status.stdout)
