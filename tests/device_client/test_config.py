"""device_client.config: the TOML file enroll writes and every command reads."""

from __future__ import annotations

import stat
from pathlib import Path

import asyncssh
import pytest
import tomli_w

from device_client.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    ClientConfig,
    ConfigError,
    config_to_dict,
    default_config_path,
    load_config,
    save_config,
)

CA = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


def make_config(tmp_path: Path, **changes: object) -> ClientConfig:
    """A valid config rooted in tmp_path."""
    values: dict[str, object] = {
        "tracker_url": "https://rly.example",
        "device_id": "dev-1",
        "key_file": tmp_path / "device_key",
        "relay_hosts": ("relay.example",),
        "relay_ports": (80, 2200),
        "relay_host_ca": CA,
        "user_ca": CA,
        "state_file": tmp_path / "state.json",
    }
    values.update(changes)
    return ClientConfig(**values)  # type: ignore[arg-type]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    """A saved config loads back equal, optional keys included."""
    config = make_config(
        tmp_path,
        target="builtin",
        host_key_file=tmp_path / "hk",
        tunnel_mode="on-demand",
        idle_timeout=90.0,
    )
    save_config(config, tmp_path / "client.toml")
    assert load_config(tmp_path / "client.toml") == config


def test_saved_file_is_private_and_new_parent_dir_is_0700(tmp_path: Path) -> None:
    """The config is written 0600 and a directory created for it is 0700."""
    path = tmp_path / "new" / "dir" / "client.toml"
    save_config(make_config(tmp_path), path)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700


def test_existing_parent_dir_mode_is_left_alone(tmp_path: Path) -> None:
    """An existing directory (such as /etc) keeps its mode."""
    tmp_path.chmod(0o755)
    save_config(make_config(tmp_path), tmp_path / "client.toml")
    assert _mode(tmp_path) == 0o755


def _write(tmp_path: Path, data: dict[str, object]) -> Path:
    path = tmp_path / "client.toml"
    path.write_text(tomli_w.dumps(data))
    return path


@pytest.mark.parametrize("key", ["tracker_url", "device_id", "relay_ports", "user_ca"])
def test_missing_key_is_named(tmp_path: Path, key: str) -> None:
    """A missing required key fails with an error naming that key."""
    data = config_to_dict(make_config(tmp_path))
    del data[key]
    with pytest.raises(ConfigError, match=f"'{key}' is missing"):
        load_config(_write(tmp_path, data))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("relay_ports", [80, 70000]),
        ("relay_ports", []),
        ("relay_hosts", "relay.example"),
        ("target", "telnet"),
        ("tunnel_mode", "sometimes"),
        ("idle_timeout", -1),
        ("relay_host_ca", "not a key"),
        ("target_port", "22"),
        ("keepalive_count", True),
        ("login_user", 'root" command="sh'),
    ],
)
def test_bad_value_is_named(tmp_path: Path, key: str, value: object) -> None:
    """A wrongly typed or out-of-range value fails with an error naming the key."""
    data = config_to_dict(make_config(tmp_path))
    data[key] = value
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(_write(tmp_path, data))


def test_unknown_key_is_named(tmp_path: Path) -> None:
    """A misspelt key is an error rather than silently ignored."""
    data = config_to_dict(make_config(tmp_path))
    data["relay_port"] = 2200
    with pytest.raises(ConfigError, match="'relay_port' is not a known setting"):
        load_config(_write(tmp_path, data))


def test_builtin_target_needs_host_key_file(tmp_path: Path) -> None:
    """target = builtin without host_key_file names the missing key."""
    data = config_to_dict(make_config(tmp_path, target="builtin"))
    with pytest.raises(ConfigError, match="'host_key_file' is missing"):
        load_config(_write(tmp_path, data))


def test_missing_and_malformed_files_are_one_line_errors(tmp_path: Path) -> None:
    """A missing file or broken TOML gives a one-line error naming the file."""
    with pytest.raises(ConfigError, match="config file not found") as missing:
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("tracker_url = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as bad:
        load_config(tmp_path / "bad.toml")
    for exc in (missing.value, bad.value):
        assert "\n" not in str(exc)


def test_default_path_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """RLY_CLIENT_CONFIG overrides /etc/rly/client.toml."""
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert default_config_path() == DEFAULT_CONFIG_PATH
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "c.toml"))
    assert default_config_path() == tmp_path / "c.toml"
