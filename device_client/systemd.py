"""`rly-client install-service`: the systemd unit and, for sshd, the CA drop-in.

Hardening depends on the target: with `sshd` the client only moves bytes to
127.0.0.1:22, so the filesystem and privileges can be locked down; with
`builtin` it spawns the technician's root login shell, and any sandboxing
would sandbox that shell too, so only settings a root shell never needs apply.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

from device_client.config import ClientConfig

log = logging.getLogger(__name__)

UNIT_NAME = "rly-client.service"
CA_FILE_NAME = "rly_user_ca.pub"
DROPIN_NAME = "50-rly.conf"

_SSHD_HARDENING = """\
# Target sshd: the client only forwards TCP to the local sshd.
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={writable}
# read-only, not yes: the client may be installed under /root or /home
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
LockPersonality=yes
CapabilityBoundingSet=
"""

_BUILTIN_HARDENING = """\
# Target builtin: the technician's root shell runs in this unit, so no
# ProtectSystem/ProtectHome/NoNewPrivileges/PrivateTmp/CapabilityBoundingSet
# here: each would confine that shell (read-only /usr, no sudo, no mounts).
"""


class InstallError(Exception):
    """A step of install-service failed (one line)."""


def unit_template() -> str:
    """The packaged unit file with its @...@ placeholders."""
    return resources.files("device_client").joinpath("systemd", UNIT_NAME).read_text("utf-8")


def client_command() -> list[str]:
    """How systemd should start rly-client: the console script, else this Python."""
    script = shutil.which("rly-client")
    if script:
        return [script]
    return [sys.executable, "-m", "device_client.cli"]


def render_unit(config: ClientConfig, config_path: Path, command: list[str] | None = None) -> str:
    """The unit text for this config (hardening chosen by the target)."""
    exec_start = shlex.join([*(command or client_command()), "run", "--config", str(config_path)])
    if config.target == "sshd":
        dirs = sorted({str(config.state_file.parent), str(config_path.parent)})
        # "-": a state directory that does not exist yet must not stop the unit
        hardening = _SSHD_HARDENING.format(writable=" ".join(f"-{d}" for d in dirs))
    else:
        hardening = _BUILTIN_HARDENING
    text = unit_template().replace("@EXEC_START@", exec_start)
    return text.replace("@HARDENING@\n", hardening)


def systemd_running() -> bool:
    """Whether systemd is PID 1 here (systemctl alone says nothing in containers)."""
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        reason = detail[-1] if detail else f"exit status {result.returncode}"
        raise InstallError(f"{' '.join(argv)} failed: {reason}")


def write_sshd_trust(config: ClientConfig, dropin_dir: Path) -> tuple[Path, Path]:
    """Write the user CA next to sshd_config and the TrustedUserCAKeys drop-in."""
    ca_file = dropin_dir.parent / CA_FILE_NAME
    dropin = dropin_dir / DROPIN_NAME
    dropin_dir.mkdir(parents=True, exist_ok=True)
    ca_file.write_text(config.user_ca.strip() + "\n", encoding="utf-8")
    ca_file.chmod(0o644)
    dropin.write_text(
        "# Written by rly-client install-service: technicians arrive with\n"
        "# short-lived certificates signed by the rly user CA.\n"
        f"TrustedUserCAKeys {ca_file}\n",
        encoding="utf-8",
    )
    dropin.chmod(0o644)
    return ca_file, dropin


def _reload_sshd(dropin: Path) -> None:
    """Check the new sshd config, then reload whichever name the unit has here."""
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if sshd:
        try:
            _run(sshd, "-t")
        except InstallError:
            dropin.unlink(missing_ok=True)
            raise
    for unit in ("ssh.service", "sshd.service"):
        try:
            _run("systemctl", "reload", unit)
            return
        except InstallError:
            continue
    log.warning("could not reload sshd; reload it by hand")


def install_service(
    config: ClientConfig, config_path: Path, *, unit_dir: Path, dropin_dir: Path, enable: bool
) -> list[str]:
    """Write the unit (and sshd trust), enable it; return one line per step done."""
    done: list[str] = []
    unit_dir.mkdir(parents=True, exist_ok=True)
    unit_file = unit_dir / UNIT_NAME
    unit_file.write_text(render_unit(config, config_path), encoding="utf-8")
    unit_file.chmod(0o644)
    done.append(f"wrote {unit_file}")
    dropin = None
    if config.target == "sshd":
        ca_file, dropin = write_sshd_trust(config, dropin_dir)
        done += [f"wrote {ca_file}", f"wrote {dropin}"]
        sshd_config = dropin_dir.parent / "sshd_config"
        if sshd_config.exists() and dropin_dir.name not in sshd_config.read_text("utf-8"):
            done.append(f"warning: {sshd_config} does not Include {dropin_dir}/*.conf")
    if not enable:
        return done
    if not systemd_running():
        done.append("systemd is not running here: start `rly-client run` another way")
        return done
    _run("systemctl", "daemon-reload")
    _run("systemctl", "enable", "--now", UNIT_NAME)
    done.append(f"enabled and started {UNIT_NAME}")
    if dropin is not None:
        _reload_sshd(dropin)
        done.append("reloaded sshd")
    return done


def service_active() -> bool | None:
    """`systemctl is-active rly-client`, or None when systemd is not running."""
    if not systemd_running():
        return None
    result = subprocess.run(["systemctl", "is-active", "--quiet", UNIT_NAME], check=False)
    return result.returncode == 0
