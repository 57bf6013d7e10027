"""Settings: a TOML file, then `RLY_<SECTION>_<KEY>` environment overrides.

Every key is declared once, in the dataclasses below; the parser derives the
accepted keys and their kinds from them, so an unknown key or a bad value stops
start-up with one line that names the key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core.validate import is_ascii_digits


class ConfigError(ValueError):
    """A one-line, user-facing configuration error that names the key."""


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Parse "30s", "5m", "1h30m", "250ms" into seconds; raise ValueError otherwise."""
    text = text.strip()
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 5m, 24h)")
    return total


def _port(name: str, default: int) -> Any:
    return field(default=default, metadata={"kind": "port", "name": name})


def _duration(default: str) -> Any:
    return field(default=parse_duration(default), metadata={"kind": "duration"})


@dataclass(frozen=True)
class RelaySettings:
    listen: str = "0.0.0.0"
    technician_port: int = _port("technician_port", 2222)
    device_ports: list[int] = field(default_factory=lambda: [2200], metadata={"kind": "ports"})
    gate_user: str = "partner"
    # not a secret: the approval is the gate; "" disables it
    gate_password: str = "partner"  # noqa: S105
    approval_ttl: float = _duration("5m")
    connect_timeout: float = _duration("30s")
    data_connect_timeout: float = _duration("3s")  # then the session uses the tunnel
    keepalive_interval: float = _duration("30s")
    keepalive_count: int = 3
    login_grace: float = _duration("30s")
    max_unauthenticated: int = 256
    max_unauthenticated_per_source: int = 16
    max_channels_per_connection: int = 16
    node_name: str = ""  # empty: the machine's hostname
    # relay peering (issue 11, SPEC 8): node-to-node SSH, private network only; 0: a free port.
    # Listens only on a shared (PostgreSQL) database; peering_listen empty: relay.listen
    peering_port: int = _port("peering_port", 2300)
    peering_listen: str = ""
    heartbeat_interval: float = _duration("5s")  # node registry; silent for 3 of them: gone
    public_host: str = ""  # host devices dial; empty: the host of http.public_url
    min_client_version: str = ""
    recordings: bool = True
    # issue 13: typed input too (passwords typed at prompts are captured), a per-file cap after
    # which only output is kept (0: none), how long recordings are kept (0: for ever)
    record_input: bool = False
    recording_max_bytes: int = 64 * 1024 * 1024
    recording_retention: float = _duration("0s")
    approval_cache: float = _duration("0s")  # remembered key-login approvals; 0: off


@dataclass(frozen=True)
class HttpSettings:
    listen: str = "0.0.0.0"
    port: int = _port("port", 8000)
    public_url: str = "http://localhost:8000"
    tls_cert: str = ""
    tls_key: str = ""
    # open HTTP connections at once; each long-polling device holds one (then 503)
    max_connections: int = 16384


@dataclass(frozen=True)
class TrackerSettings:
    checkin_wait: float = _duration("25s")
    checkin_interval: float = _duration("30s")
    tunnel_mode: str = "persistent"
    clock_skew: float = _duration("5m")


@dataclass(frozen=True)
class PortalSettings:
    session_ttl: float = _duration("12h")
    login_attempts_per_user: int = 5
    login_attempts_per_source: int = 20
    login_window: float = _duration("15m")


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("./rly-data")
    database_url: str = ""
    database_notify: bool = True  # PostgreSQL LISTEN/NOTIFY for events; false: poll every 0.3 s
    log_level: str = "info"
    relay: RelaySettings = field(default_factory=RelaySettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    tracker: TrackerSettings = field(default_factory=TrackerSettings)
    portal: PortalSettings = field(default_factory=PortalSettings)

    @property
    def effective_database_url(self) -> str:
        """The configured URL, or the embedded SQLite file in the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'rly.sqlite3').resolve()}"

    def with_data_dir(self, data_dir: Path) -> Settings:
        return dataclasses.replace(self, data_dir=data_dir)


_SECTIONS: dict[str, type[Any]] = {
    "relay": RelaySettings,
    "http": HttpSettings,
    "tracker": TrackerSettings,
    "portal": PortalSettings,
}


def _convert(key: str, fld: dataclasses.Field[Any], raw: Any, from_env: bool) -> Any:
    kind = fld.metadata.get("kind")
    try:
        if kind == "duration":
            if isinstance(raw, int | float) and not isinstance(raw, bool):
                value = float(raw)
            else:
                value = parse_duration(str(raw))
            if value < 0:
                raise ValueError("must not be negative")
            return value
        if kind == "port":
            return _check_port(_as_int(raw, from_env))
        if kind == "ports":
            items = raw.split(",") if from_env and isinstance(raw, str) else raw
            if not isinstance(items, list) or not items:
                raise ValueError("must be a non-empty list of ports")
            return [_check_port(_as_int(item, from_env)) for item in items]
        if fld.type in ("bool", bool):
            return _as_bool(raw, from_env)
        if fld.type in ("int", int):
            value = _as_int(raw, from_env)
            if value < 0:
                raise ValueError("must not be negative")
            return value
        if fld.type in ("Path", Path):
            return Path(_as_str(raw))
        return _as_str(raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"Config '{key}' is invalid: {exc}") from None


def _as_int(raw: Any, from_env: bool) -> int:
    if isinstance(raw, bool):
        raise ValueError("must be an integer")
    if isinstance(raw, int):
        return raw
    if from_env and isinstance(raw, str) and is_ascii_digits(raw.strip().removeprefix("-")):
        return int(raw.strip())
    raise ValueError(f"must be an integer, got {raw!r}")


def _check_port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError(f"port {value} is outside 0-65535")
    return value


def _as_bool(raw: Any, from_env: bool) -> bool:
    if isinstance(raw, bool):
        return raw
    if (
        from_env
        and isinstance(raw, str)
        and raw.lower() in ("1", "true", "yes", "0", "false", "no")
    ):
        return raw.lower() in ("1", "true", "yes")
    raise ValueError(f"must be true or false, got {raw!r}")


def _as_str(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"must be a string, got {raw!r}")
    if any(ord(ch) < 32 for ch in raw):
        raise ValueError("must not contain control characters")
    return raw


def _build(cls: type[Any], values: Mapping[str, Any], prefix: str, env_prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _SECTIONS}
    kwargs: dict[str, Any] = {}
    for name, raw in values.items():
        if name not in fields:
            raise ConfigError(f"Config '{prefix}{name}' is not a known key")
        kwargs[name] = _convert(prefix + name, fields[name], raw, from_env=False)
    for name, fld in fields.items():
        env_name = f"{env_prefix}{name}".upper()
        if env_name in os.environ:
            kwargs[name] = _convert(env_name, fld, os.environ[env_name], from_env=True)
    return cls(**kwargs)


def _check_unknown_env(env: Mapping[str, str]) -> None:
    known = {f"RLY_{f.name}".upper() for f in dataclasses.fields(Settings)}
    for section, cls in _SECTIONS.items():
        known |= {f"RLY_{section}_{f.name}".upper() for f in dataclasses.fields(cls)}
    sections = tuple(f"RLY_{name.upper()}_" for name in _SECTIONS)
    for name in env:
        if name.startswith(sections) and name not in known:
            raise ConfigError(f"Config '{name}' is not a known key")


def load_settings(path: Path | None = None, *, data_dir: Path | None = None) -> Settings:
    """Read the TOML file (optional), apply environment overrides, validate."""
    document: dict[str, Any] = {}
    if path is not None:
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"Config file '{path}' cannot be read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Config file '{path}' is not valid TOML: {exc}") from None
    _check_unknown_env(os.environ)
    sections: dict[str, Any] = {}
    top: dict[str, Any] = {}
    for name, value in document.items():
        if name in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"Config '{name}' must be a table")
            sections[name] = _build(_SECTIONS[name], value, f"{name}.", f"RLY_{name}_")
        else:
            top[name] = value
    for name, cls in _SECTIONS.items():
        if name not in sections:
            sections[name] = _build(cls, {}, f"{name}.", f"RLY_{name}_")
    settings: Settings = _build(Settings, top, "", "RLY_")
    settings = dataclasses.replace(settings, **sections)
    if data_dir is not None:
        settings = settings.with_data_dir(data_dir)
    if path is not None and not settings.data_dir.is_absolute():
        settings = settings.with_data_dir(path.parent / settings.data_dir)
    _validate(settings)
    return settings


def with_bound_http_port(settings: Settings, port: int) -> Settings:
    """The default `http.public_url` names the HTTP port actually served (0 or not 8000).

    An operator-set public URL is kept as written: it may sit behind a proxy.
    """
    if settings.http.public_url != HttpSettings.public_url or port == 0:
        return settings
    scheme = "https" if settings.http.tls_cert else "http"
    http = dataclasses.replace(settings.http, public_url=f"{scheme}://localhost:{port}")
    return dataclasses.replace(settings, http=http)


def _validate(settings: Settings) -> None:
    for key, host in (
        ("relay.listen", settings.relay.listen),
        ("http.listen", settings.http.listen),
        ("relay.peering_listen", settings.relay.peering_listen or "localhost"),
    ):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise ConfigError(f"Config '{key}' is not an IP address: {host!r}") from None
    url = urlsplit(settings.http.public_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(
            f"Config 'http.public_url' must be an http(s) URL, got {settings.http.public_url!r}"
        )
    if bool(settings.http.tls_cert) != bool(settings.http.tls_key):
        raise ConfigError("Config 'http.tls_cert' and 'http.tls_key' must be set together")
    if settings.tracker.tunnel_mode not in ("persistent", "on-demand"):
        raise ConfigError("Config 'tracker.tunnel_mode' must be 'persistent' or 'on-demand'")
    if settings.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("Config 'log_level' must be debug, info, warning or error")
    if settings.relay.heartbeat_interval <= 0:
        raise ConfigError("Config 'relay.heartbeat_interval' must be positive")
    if settings.relay.keepalive_count < 1:
        raise ConfigError("Config 'relay.keepalive_count' must be at least 1")
    if not 1 <= settings.http.max_connections <= 1_000_000:
        raise ConfigError("Config 'http.max_connections' must be between 1 and 1000000")
    if settings.tracker.checkin_wait > 60:
        raise ConfigError("Config 'tracker.checkin_wait' must be at most 60s")
    if not settings.relay.gate_user or not re.fullmatch(
        r"[a-z_][a-z0-9_.-]{0,31}", settings.relay.gate_user
    ):
        raise ConfigError("Config 'relay.gate_user' must be a valid user name")
