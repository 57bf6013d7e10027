"""Peering settings and node certificates, without processes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from core.config import ConfigError, load_settings
from core.keys import KeyStore
from relay.peering.pool import split_address
from relay.peering.route import peering_enabled


def test_peering_defaults_and_bad_listen_address(tmp_path: Path) -> None:
    """Port 2300 on relay.listen by default; a peering_listen that is no IP names the key."""
    s = load_settings()
    assert s.relay.peering_port == 2300 and s.relay.peering_listen == ""
    path = tmp_path / "rly.toml"
    path.write_text('[relay]\npeering_listen = "relay-b.internal"\n')
    with pytest.raises(ConfigError, match=r"Config 'relay\.peering_listen' is not an IP address"):
        load_settings(path)
    path.write_text("[relay]\npeering_port = 70000\n")
    with pytest.raises(ConfigError, match="peering_port"):
        load_settings(path)


def test_peering_only_on_a_shared_database(tmp_path: Path) -> None:
    """The embedded SQLite default opens no peering port; a PostgreSQL URL does."""
    path = tmp_path / "rly.toml"
    path.write_text(f'data_dir = "{tmp_path}"\n')
    assert not peering_enabled(load_settings(path))
    path.write_text(f'data_dir = "{tmp_path}"\ndatabase_url = "postgresql+psycopg://db/rly"\n')
    assert peering_enabled(load_settings(path))


def test_node_certificates_name_the_node_and_come_from_the_host_ca(tmp_path: Path) -> None:
    """Both node certificates carry only the node name, are signed by the host CA (not the
    user CA), and the client one permits nothing but port forwarding."""
    store = KeyStore.load_or_create(tmp_path / "data", ["relay.example"])
    node = store.node_identity("relay-b")
    host_ca = store.host_ca.public_data
    shown = {}
    for kind, cert in (("host", node.host_cert), ("user", node.client_cert)):
        assert cert.principals == ["relay-b"]
        assert cert.signing_key.public_data == host_ca != store.user_ca.public_data
        cert.write_certificate(str(tmp_path / f"{kind}-cert.pub"))
        shown[kind] = subprocess.run(
            ["ssh-keygen", "-L", "-f", str(tmp_path / f"{kind}-cert.pub")],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert f"Type: ssh-ed25519-cert-v01@openssh.com {kind} certificate" in shown[kind]
        assert 'Key ID: "rly-node:relay-b"' in shown[kind]
    extensions = shown["user"].split("Extensions:")[1].split()
    assert extensions == ["permit-port-forwarding"], extensions


def test_split_address() -> None:
    """host:port and [v6]:port parse; anything else is refused."""
    assert split_address("127.0.1.2:2300") == ("127.0.1.2", 2300)
    assert split_address("[::1]:2300") == ("::1", 2300)
    for bad in ("nohost", ":2300", "host:", "host:x"):
        with pytest.raises(ValueError, match="host:port"):
            split_address(bad)
