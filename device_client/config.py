"""The client's TOML config file: written once by `enroll`, read by every command.

Every value is checked on load so that a hand-edited file fails at start-up
with the key's name instead of deep inside the tunnel code.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import tomli_w

from core.tls_identity import normalize_fingerprint
from device_client.endpoints import EndpointError, parse_endpoint
from device_client.proxy import ProxyError, parse_proxy

DEFAULT_CONFIG_PATH = Path("/etc/rly/client.toml")
CONFIG_ENV = "RLY_CLIENT_CONFIG"
TARGETS = ("sshd", "builtin")
TUNNEL_MODES = ("persistent", "on-demand")
# POSIX-ish user names; it ends up inside an authorized_keys option, so no quotes.
_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")


class ConfigError(ValueError):
    """The config file is missing, unreadable or has a bad key (one line)."""


@dataclass(frozen=True)
class ClientConfig:
    """Everything `run`, `status` and `install-service` need to know."""

    tracker_url: str
    device_id: str
    key_file: Path
    relay_hosts: tuple[str, ...]
    relay_ports: tuple[int, ...]
    relay_host_ca: str
    user_ca: str
    state_file: Path
    login_user: str = "root"
    target: str = "sshd"
    target_host: str = "127.0.0.1"
    target_port: int = 22
    host_key_file: Path | None = None
    tunnel_mode: str = "persistent"
    idle_timeout: float = 600.0
    keepalive_interval: float = 30.0
    keepalive_count: int = 3
    # ways to reach the relay, in order (empty: relay_hosts x relay_ports, then WebSocket)
    relay_endpoints: tuple[str, ...] = ()
    proxy: str = ""  # http://[user:pass@]host:port for HTTP CONNECT (else $HTTPS_PROXY)
    tls_ca_file: Path | None = None  # pinned CA (or certificate) of the tracker and relay
    tls_fingerprint: str = ""  # pinned SHA-256 fingerprint of their TLS certificate


_REQUIRED = (
    "tracker_url",
    "device_id",
    "key_file",
    "relay_hosts",
    "relay_ports",
    "relay_host_ca",
    "user_ca",
    "state_file",
)
_OPTIONAL_EMPTY = ("relay_endpoints", "proxy", "tls_fingerprint")  # not written when empty
_FIELDS = {field.name for field in dataclasses.fields(ClientConfig)}


def default_config_path() -> Path:
    """The config path when --config is not given: $RLY_CLIENT_CONFIG or /etc/rly."""
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def _bad(key: str, why: str) -> ConfigError:
    return ConfigError(f"config key '{key}' {why}")


def _text(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value.strip():
        raise _bad(key, "must be a non-empty string")
    return value


def _port(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise _bad(key, "must be a port number (1-65535)")
    return value


def _positive(data: dict[str, Any], key: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise _bad(key, "must be a positive number")
    return float(value)


def _choice(data: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = data[key]
    if value not in choices:
        raise _bad(key, f"must be one of: {', '.join(choices)}")
    return str(value)


def _user(data: dict[str, Any], key: str) -> str:
    value = _text(data, key)
    if not _USER_NAME.fullmatch(value):
        raise _bad(key, "must be a user name (letters, digits, _ . -)")
    return value


def _public_key(data: dict[str, Any], key: str) -> str:
    value = _text(data, key)
    try:
        asyncssh.import_public_key(value)
    except (asyncssh.KeyImportError, ValueError):
        raise _bad(key, "is not an OpenSSH public key line") from None
    return value.strip()


def _hosts(data: dict[str, Any]) -> tuple[str, ...]:
    value = data["relay_hosts"]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(item, str) and item for item in value)
    ):
        raise _bad("relay_hosts", "must be a non-empty list of host names")
    return tuple(value)


def _ports(data: dict[str, Any]) -> tuple[int, ...]:
    value = data["relay_ports"]
    if not isinstance(value, list) or not value:
        raise _bad("relay_ports", "must be a non-empty list of port numbers")
    return tuple(_port("relay_ports", item) for item in value)


def config_from_dict(data: dict[str, Any]) -> ClientConfig:
    """Validate a parsed TOML table; the first bad key raises ConfigError."""
    for key in data:
        if key not in _FIELDS:
            raise _bad(key, "is not a known setting")
    for key in _REQUIRED:
        if key not in data:
            raise _bad(key, "is missing")
    defaults = ClientConfig(
        tracker_url="",
        device_id="",
        key_file=Path(),
        relay_hosts=(),
        relay_ports=(),
        relay_host_ca="",
        user_ca="",
        state_file=Path(),
    )
    merged = {**dataclasses.asdict(defaults), **data}
    host_key = merged["host_key_file"]
    if merged["target"] == "builtin" and not host_key:
        raise _bad("host_key_file", "is missing (needed by target 'builtin')")
    return ClientConfig(
        tracker_url=_text(merged, "tracker_url"),
        device_id=_text(merged, "device_id"),
        key_file=Path(_text(merged, "key_file")),
        relay_hosts=_hosts(merged),
        relay_ports=_ports(merged),
        relay_host_ca=_public_key(merged, "relay_host_ca"),
        user_ca=_public_key(merged, "user_ca"),
        state_file=Path(_text(merged, "state_file")),
        login_user=_user(merged, "login_user"),
        target=_choice(merged, "target", TARGETS),
        target_host=_text(merged, "target_host"),
        target_port=_port("target_port", merged["target_port"]),
        host_key_file=Path(_text(merged, "host_key_file")) if host_key else None,
        tunnel_mode=_choice(merged, "tunnel_mode", TUNNEL_MODES),
        idle_timeout=_positive(merged, "idle_timeout"),
        keepalive_interval=_positive(merged, "keepalive_interval"),
        keepalive_count=int(_positive(merged, "keepalive_count")),
        **_transport_settings(merged),
    )


def _transport_settings(data: dict[str, Any]) -> dict[str, Any]:
    """relay_endpoints, proxy and the TLS pin, each checked (no secret in an error)."""
    endpoints = data["relay_endpoints"]
    if not isinstance(endpoints, list | tuple) or not all(isinstance(e, str) for e in endpoints):
        raise _bad("relay_endpoints", "must be a list of URLs (ssh://host:port, wss://host/...)")
    try:
        parsed = tuple(str(parse_endpoint(e)) for e in endpoints)
    except EndpointError as exc:
        raise _bad("relay_endpoints", f"is wrong: {exc}") from None
    proxy = data["proxy"]
    if not isinstance(proxy, str):
        raise _bad("proxy", "must be a string")
    if proxy:
        try:
            parse_proxy(proxy, "config key 'proxy'")
        except ProxyError as exc:
            raise ConfigError(str(exc)) from None
    fingerprint = data["tls_fingerprint"]
    if not isinstance(fingerprint, str):
        raise _bad("tls_fingerprint", "must be a string")
    if fingerprint:
        try:
            fingerprint = normalize_fingerprint(fingerprint)
        except ValueError as exc:
            raise _bad("tls_fingerprint", f"is wrong: {exc}") from None
    ca_file = data["tls_ca_file"]
    if ca_file is not None and not isinstance(ca_file, str | Path):
        raise _bad("tls_ca_file", "must be a file path")
    if ca_file and fingerprint:
        raise _bad("tls_ca_file", "and tls_fingerprint cannot both be set")
    return {
        "relay_endpoints": parsed,
        "proxy": proxy,
        "tls_ca_file": Path(ca_file) if ca_file else None,
        "tls_fingerprint": fingerprint,
    }


def load_config(path: Path) -> ClientConfig:
    """Read and validate the config file; errors name the file and the key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (run rly-client enroll)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def config_to_dict(config: ClientConfig) -> dict[str, Any]:
    """The TOML table for a config (paths as strings, optional keys dropped)."""
    data: dict[str, Any] = {}
    for key, value in dataclasses.asdict(config).items():
        if value is None or (key in _OPTIONAL_EMPTY and not value):
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        data[key] = value
    return data


def ensure_private_parent(path: Path) -> None:
    """Create a file's missing parent directory 0700 (it will hold secrets)."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(parents=True, mode=0o700)
        parent.chmod(0o700)


def write_private(path: Path, data: bytes) -> None:
    """Write a file that is 0600 from its first byte, replacing it atomically."""
    ensure_private_parent(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_config(config: ClientConfig, path: Path) -> None:
    """Write the config file 0600 (it names the key file and pinned CAs)."""
    write_private(path, tomli_w.dumps(config_to_dict(config)).encode("utf-8"))
