"""The rly-client.service unit and install-service's files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from device_client.cli import main
from device_client.config import ClientConfig, save_config
from device_client.systemd import render_unit, unit_template
from tests.device_client.test_config import make_config

COMMAND = [sys.executable, "-m", "device_client.cli"]


def _builtin(tmp_path: Path) -> ClientConfig:
    return replace(make_config(tmp_path), target="builtin", host_key_file=tmp_path / "hk")


def _directives(text: str) -> dict[str, str]:
    lines = [line for line in text.splitlines() if "=" in line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def test_packaged_template_has_restart_always_and_placeholders() -> None:
    """The unit shipped as package data restarts always and is filled at install time."""
    text = unit_template()
    assert "Restart=always" in text
    assert "ExecStart=@EXEC_START@" in text
    assert "Description=RLY Client Service" in text


def test_sshd_unit_is_hardened(tmp_path: Path) -> None:
    """For the sshd target the unit runs `run --config` and locks the filesystem down."""
    unit = _directives(render_unit(make_config(tmp_path), tmp_path / "c.toml", COMMAND))
    expected = f"{sys.executable} -m device_client.cli run --config {tmp_path}/c.toml"
    assert unit["ExecStart"] == expected
    assert unit["Restart"] == "always"
    assert unit["NoNewPrivileges"] == "yes"
    assert unit["ProtectSystem"] == "strict"
    assert f"-{tmp_path}" in unit["ReadWritePaths"].split()
    assert "@" not in render_unit(make_config(tmp_path), tmp_path / "c.toml", COMMAND)


def test_builtin_unit_does_not_confine_the_root_shell(tmp_path: Path) -> None:
    """For the builtin target no setting that would confine a root login shell is present."""
    unit = _directives(render_unit(_builtin(tmp_path), tmp_path / "c.toml", COMMAND))
    assert unit["Restart"] == "always"
    for confining in (
        "NoNewPrivileges",
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "CapabilityBoundingSet",
        "PrivateDevices",
        "RestrictNamespaces",
    ):
        assert confining not in unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("builtin", [False, True])
def test_rendered_units_pass_systemd_analyze_verify(tmp_path: Path, builtin: bool) -> None:
    """systemd-analyze verify accepts both rendered units without a single complaint."""
    config = _builtin(tmp_path) if builtin else make_config(tmp_path)
    unit = tmp_path / "rly-client.service"
    unit.write_text(render_unit(config, tmp_path / "c.toml", COMMAND))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    complaints = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "rly-client.service" in line
    ]
    assert result.returncode == 0
    assert complaints == []


def _install(tmp_path: Path, config: ClientConfig) -> tuple[int, Path, Path]:
    config_path = tmp_path / "client.toml"
    save_config(config, config_path)
    units, dropins = tmp_path / "units", tmp_path / "ssh" / "sshd_config.d"
    code = main(
        [
            "install-service",
            "--config",
            str(config_path),
            "--unit-dir",
            str(units),
            "--sshd-dropin-dir",
            str(dropins),
            "--no-enable",
        ]
    )
    return code, units, dropins


def test_install_service_sshd_writes_unit_ca_and_dropin(tmp_path: Path) -> None:
    """install-service for sshd writes the unit, the user CA and the TrustedUserCAKeys drop-in."""
    config = make_config(tmp_path)
    code, units, dropins = _install(tmp_path, config)
    assert code == 0
    assert "Restart=always" in (units / "rly-client.service").read_text()
    ca_file = tmp_path / "ssh" / "rly_user_ca.pub"
    assert ca_file.read_text().strip() == config.user_ca
    [dropin] = dropins.iterdir()
    assert f"TrustedUserCAKeys {ca_file}" in dropin.read_text().splitlines()


def test_install_service_builtin_leaves_sshd_alone(tmp_path: Path) -> None:
    """install-service for the builtin target writes only the unit."""
    code, units, dropins = _install(tmp_path, _builtin(tmp_path))
    assert code == 0
    assert (units / "rly-client.service").exists()
    assert not dropins.exists()
    assert not (tmp_path / "ssh").exists()


def test_install_service_unwritable_dir_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A unit directory that cannot be created fails with exit 2 and one stderr line."""
    config_path = tmp_path / "client.toml"
    save_config(make_config(tmp_path), config_path)
    (tmp_path / "file").write_text("")
    code = main(
        [
            "install-service",
            "--config",
            str(config_path),
            "--unit-dir",
            str(tmp_path / "file" / "units"),
            "--no-enable",
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.count("\n") == 1
