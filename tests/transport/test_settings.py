"""The client's transport settings: endpoint URLs, proxy choice and TLS pins, checked on load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.tls_identity import normalize_fingerprint
from device_client.config import ConfigError, config_from_dict
from device_client.endpoints import default_endpoints
from device_client.proxy import ProxyError, choose_proxy, parse_proxy

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGzJ0X7y6ZbqFvGv3Xq0tZ5m5rJ0s1yE9cW7d6l0uH3c"


def base(**extra: Any) -> dict[str, Any]:
    return {
        "tracker_url": "https://relay.example",
        "device_id": "abcdefghij",
        "key_file": "/k",
        "relay_hosts": ["relay.example"],
        "relay_ports": [80, 2200],
        "relay_host_ca": KEY,
        "user_ca": KEY,
        "state_file": "/s",
        **extra,
    }


def test_default_endpoints_are_ssh_ports_then_websocket_on_the_https_port() -> None:
    """Without relay_endpoints: each host on each SSH port, then wss on the tracker's port."""
    found = [str(e) for e in default_endpoints(["r"], [80, 2200], "https://t.example:8443")]
    assert found == ["ssh://r:80", "ssh://r:2200", "wss://r:8443/api/v1/tunnel"]


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"relay_endpoints": ["ftp://r:1"]}, "relay_endpoints"),
        ({"relay_endpoints": ["ssh://r"]}, "relay_endpoints"),
        ({"tls_fingerprint": "SHA256:short"}, "tls_fingerprint"),
        ({"tls_ca_file": "/ca.pem", "tls_fingerprint": "ab" * 32}, "tls_ca_file"),
    ],
)
def test_bad_transport_settings_name_their_key(extra: dict[str, Any], named: str) -> None:
    """A bad endpoint, fingerprint or a double pin is one line naming the key."""
    with pytest.raises(ConfigError, match=f"'{named}'"):
        config_from_dict(base(**extra))


def test_a_bad_proxy_never_echoes_its_password() -> None:
    """The proxy setting is a secret: its error names the key, not the value."""
    with pytest.raises(ConfigError) as raised:
        config_from_dict(base(proxy="socks5://user:hunter2@p:1080"))
    assert "'proxy'" in str(raised.value) and "hunter2" not in str(raised.value)
    proxy = parse_proxy("http://user:hunter2@p:3128", "x")
    assert "hunter2" not in str(proxy) and "hunter2" not in repr(proxy)


def test_proxy_comes_from_config_else_environment_and_no_proxy_bypasses() -> None:
    """The config's proxy wins over $HTTPS_PROXY; NO_PROXY names hosts, suffixes and CIDRs."""
    env = {"HTTPS_PROXY": "http://envproxy:3128", "NO_PROXY": ".corp,10.0.0.0/8,direct"}
    assert str(choose_proxy("", "relay.example", env)) == "http://envproxy:3128"
    assert str(choose_proxy("http://cfg:8080", "relay.example", env)) == "http://cfg:8080"
    for host in ("relay.corp", "10.1.2.3", "direct"):
        assert choose_proxy("", host, env) is None
    assert choose_proxy("", "relay.example", {}) is None
    with pytest.raises(ProxyError):
        parse_proxy("https://p:1", "x")


def test_fingerprints_accept_openssl_hex_and_openssh_base64() -> None:
    """`openssl x509 -fingerprint -sha256` output and SHA256:<base64> name the same pin."""
    hex_form = ":".join(["AB"] * 32)
    pin = normalize_fingerprint(hex_form)
    assert pin.startswith("SHA256:") and normalize_fingerprint(pin) == pin
    assert config_from_dict(base(tls_fingerprint=hex_form)).tls_fingerprint == pin
    assert config_from_dict(base(tls_ca_file="/ca.pem")).tls_ca_file == Path("/ca.pem")
