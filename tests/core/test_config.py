"""Config: TOML plus RLY_<SECTION>_<KEY> overrides, strict keys and values."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.config import ConfigError, load_settings, parse_duration


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rly.toml"
    path.write_text(text)
    return path


def test_defaults_match_the_public_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a file the documented defaults apply."""
    s = load_settings()
    assert s.relay.technician_port == 2222
    assert s.relay.device_ports == [2200]
    assert s.relay.gate_user == "partner"
    assert s.relay.approval_ttl == 300
    assert s.relay.keepalive_interval == 30 and s.relay.keepalive_count == 3
    assert s.http.port == 8000 and s.http.public_url == "http://localhost:8000"


def test_file_and_environment_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Environment variables win over the file, and durations parse."""
    path = write(
        tmp_path, '[relay]\napproval_ttl = "2m"\ndevice_ports = [80, 2200]\n[http]\nport = 9000\n'
    )
    monkeypatch.setenv("RLY_HTTP_PORT", "9100")
    monkeypatch.setenv("RLY_RELAY_DEVICE_PORTS", "8080,2201")
    s = load_settings(path)
    assert s.relay.approval_ttl == 120
    assert s.http.port == 9100
    assert s.relay.device_ports == [8080, 2201]


def test_relative_data_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    """A relative data_dir in a file means next to that file, not the working directory."""
    s = load_settings(write(tmp_path, 'data_dir = "state"\n'))
    assert s.data_dir == tmp_path / "state"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[relay]\ntechnician_prot = 22\n", "relay.technician_prot"),
        ("colour = 'blue'\n", "colour"),
        ("[http]\nport = 70000\n", "http.port"),
        ("[http]\nport = 'eighty'\n", "http.port"),
        ("[relay]\ndevice_ports = []\n", "relay.device_ports"),
        ("[relay]\napproval_ttl = 'soon'\n", "relay.approval_ttl"),
        ("[relay]\nkeepalive_count = -1\n", "relay.keepalive_count"),
        ("[http]\npublic_url = 'ftp://x'\n", "http.public_url"),
        ("[relay]\nlisten = 'not-an-ip'\n", "relay.listen"),
        ("relay = 3\n", "relay"),
    ],
)
def test_bad_keys_and_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    """Each unknown key or bad value is refused with one line naming the key."""
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    message = str(info.value)
    assert f"'{key}'" in message
    assert "\n" not in message


def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad override names the environment variable, and a misspelt one is refused."""
    monkeypatch.setenv("RLY_HTTP_PORT", "99999")
    with pytest.raises(ConfigError, match="'RLY_HTTP_PORT'"):
        load_settings()
    monkeypatch.delenv("RLY_HTTP_PORT")
    monkeypatch.setenv("RLY_HTTP_PROT", "1")
    with pytest.raises(ConfigError, match="'RLY_HTTP_PROT' is not a known key"):
        load_settings()


@pytest.mark.parametrize(
    "value", ["\uff18\uff10\uff10\uff10", "\u0668\u0660\u0660\u0660", "8\u00b2"]
)
def test_environment_integers_take_ascii_digits_only(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """Full-width, Arabic-Indic or superscript digits are not a number (int() would take some)."""
    monkeypatch.setenv("RLY_HTTP_PORT", value)
    with pytest.raises(ConfigError, match="'RLY_HTTP_PORT' is invalid"):
        load_settings()


def test_invalid_toml_is_one_line(tmp_path: Path) -> None:
    """A file that is not TOML is refused with the file name."""
    path = write(tmp_path, "[relay\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25), ("2d", 172800)],
)
def test_durations(text: str, seconds: float) -> None:
    """Durations combine units."""
    assert parse_duration(text) == pytest.approx(seconds)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_config_text_is_valid_or_one_line_refusal(text: str) -> None:
    """Fuzzed config text gives a Settings or a one-line ConfigError, never another exception."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rly.toml"
        path.write_bytes(text.encode("utf-8", errors="replace"))
        outcome = ""
        try:
            load_settings(path)
        except ConfigError as exc:
            outcome = str(exc)
    assert "\n" not in outcome
