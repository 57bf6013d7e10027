"""`rly-client`: enroll, run, status and install-service.

Every failure is one line on stderr and exit status 2; `status` exits 3 when
the client is not running with a tunnel up (like `systemctl status`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncssh

from core.tls_identity import normalize_fingerprint, pem_certificates
from device_client import __version__
from device_client.api import EnrollReply, TrackerClient, TrackerError
from device_client.config import (
    CONFIG_ENV,
    TARGETS,
    ClientConfig,
    ConfigError,
    config_from_dict,
    config_to_dict,
    default_config_path,
    load_config,
    save_config,
    write_private,
)
from device_client.proxy import ProxyError, parse_proxy
from device_client.runner import os_release
from device_client.status_report import status_report
from device_client.systemd import InstallError, install_service
from device_client.tls import TlsTrust
from device_client.tunnel import BACKOFF_CAP_ENV, backoff_cap_from_env

EXIT_ERROR = 2
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # journald adds its own timestamps
EXIT_NOT_RUNNING = 3
_ERRORS = (ConfigError, TrackerError, InstallError, OSError, asyncssh.Error, ValueError)


class CliError(Exception):
    """A bad argument noticed after parsing (one line, exit 2)."""


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else default_config_path()


def device_serial() -> str:
    """The DMI serial when readable and set, else the machine id."""
    for path in ("/sys/class/dmi/id/product_serial", "/etc/machine-id"):
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if value and value.lower() not in ("none", "to be filled by o.e.m.", "0"):
            return value
    return "unknown"


def _check_tracker_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CliError(f"--tracker must be an http:// or https:// URL, not {url!r}")
    return url.rstrip("/")


@dataclass(frozen=True)
class EnrollFiles:
    """The files one config owns, all absolute and named after the config file.

    `client.toml` owns `client.key`, `client.host_key` and `client.state.json`
    beside it, so two configs in one directory never share a key or a state file.
    """

    config: Path
    key: Path
    host_key: Path
    state: Path

    @classmethod
    def for_config(cls, config_path: Path, key_file: str | None) -> EnrollFiles:
        config = config_path.absolute()
        files = cls(
            config=config,
            key=Path(key_file).absolute() if key_file else config.with_suffix(".key"),
            host_key=config.with_suffix(".host_key"),
            state=config.with_suffix(".state.json"),
        )
        if config in (files.key, files.host_key, files.state):
            raise CliError(f"--config {config} would also be its own key or state file")
        return files


def _key_for(path: Path, new_key: bool, what: str) -> tuple[asyncssh.SSHKey, bool]:
    """(key, reused): the key already in `path` unless --new-key, else a fresh ed25519 key."""
    if path.exists() and not new_key:
        key = asyncssh.read_private_key(str(path))
        print(f"using the existing {what} {path} (--new-key replaces it)")
        return key, True
    return asyncssh.generate_private_key("ssh-ed25519"), False


async def _target_host_key(
    args: argparse.Namespace, host_key: asyncssh.SSHKey | None
) -> str | None:
    from device_client.target import fetch_sshd_host_key

    if host_key is not None:
        return host_key.export_public_key().decode("ascii").strip()
    return await fetch_sshd_host_key(args.target_host, args.target_port)


async def _enroll_request(
    args: argparse.Namespace, key: asyncssh.SSHKey, host_key: asyncssh.SSHKey | None
) -> EnrollReply:
    os_name, os_version = os_release()
    body: dict[str, Any] = {
        "token": args.token,
        "hostname": args.hostname or socket.gethostname(),
        "serial": args.serial or device_serial(),
        "os_name": os_name,
        "os_version": os_version,
        "client_version": __version__,
        "public_key": key.export_public_key().decode("ascii").strip(),
    }
    target_key = await _target_host_key(args, host_key)
    if target_key:
        body["target_host_key"] = target_key
    async with TrackerClient(
        args.tracker, proxy=args.proxy or "", trust=_enroll_trust(args)
    ) as tracker:
        return await tracker.enroll(body)


def _enroll_trust(args: argparse.Namespace) -> TlsTrust:
    """The TLS pin given to enroll (--ca-file or --tracker-fingerprint), checked."""
    if args.ca_file and args.tracker_fingerprint:
        raise CliError("give --ca-file or --tracker-fingerprint, not both")
    if args.tracker_fingerprint:
        try:
            return TlsTrust(fingerprint=normalize_fingerprint(args.tracker_fingerprint))
        except ValueError as exc:
            raise CliError(f"--tracker-fingerprint: {exc}") from None
    if args.ca_file:
        path = Path(args.ca_file)
        try:
            found = pem_certificates(path.read_text(encoding="ascii"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CliError(f"--ca-file {path}: cannot read a PEM certificate: {exc}") from None
        if not found:
            raise CliError(f"--ca-file {path}: no PEM certificate in it")
        return TlsTrust(ca_file=path)
    return TlsTrust()


def _pin_files_check_proxy(args: argparse.Namespace) -> None:
    if args.proxy:
        try:
            parse_proxy(args.proxy, "--proxy")
        except ProxyError as exc:
            raise CliError(str(exc)) from None


def _pin_files(args: argparse.Namespace, config_path: Path) -> dict[str, Any]:
    """Config fields for the TLS pin and proxy; --ca-file is copied beside the config (0600)."""
    fields: dict[str, Any] = {"proxy": args.proxy or ""}
    trust = _enroll_trust(args)
    fields["tls_fingerprint"] = trust.fingerprint
    if trust.ca_file is not None:
        copy = config_path.absolute().with_suffix(".tracker-ca.pem")
        if trust.ca_file.absolute() != copy:
            write_private(copy, trust.ca_file.read_bytes())
        fields["tls_ca_file"] = copy
    return fields


def cmd_enroll(args: argparse.Namespace) -> int:
    """Register this device with the tracker and write key + config files."""
    tracker_url = _check_tracker_url(args.tracker)
    files = EnrollFiles.for_config(_config_path(args), args.key_file)
    if not 0 < args.target_port < 65536:
        raise CliError("--target-port must be between 1 and 65535")
    _enroll_trust(args)  # a bad pin or proxy is refused before any key is made
    _pin_files_check_proxy(args)
    key, reused = _key_for(files.key, args.new_key, "device key")
    host_key = None
    if args.target == "builtin":
        host_key, _ = _key_for(files.host_key, args.new_key, "builtin host key")
    try:
        reply = asyncio.run(_enroll_request(args, key, host_key))
    except TrackerError as exc:
        if reused and exc.status_code == 409:
            raise CliError(f"{exc}; pass --new-key to replace {files.key} (a new device)") from None
        raise
    config = config_from_dict(
        config_to_dict(
            ClientConfig(  # validates what the tracker sent
                tracker_url=tracker_url,
                device_id=reply.device_id,
                key_file=files.key,
                relay_hosts=tuple(reply.relay_hosts),
                relay_ports=tuple(reply.relay_ports),
                relay_host_ca=reply.relay_host_ca,
                user_ca=reply.user_ca,
                state_file=files.state,
                login_user=reply.login_user,
                target=args.target,
                target_host=args.target_host,
                target_port=args.target_port,
                host_key_file=files.host_key if host_key else None,
                tunnel_mode=reply.tunnel_mode,
                **_pin_files(args, files.config),
            )
        )
    )
    _write_enrollment(config, files.config, key, host_key)
    print(f"enrolled: device {reply.device_id}, status {reply.status}")
    if reply.status == "pending":
        print("an admin must accept this device in the portal before it can connect")
    print(f"config written to {files.config}")
    return 0


def _write_enrollment(
    config: ClientConfig, config_path: Path, key: asyncssh.SSHKey, host_key: asyncssh.SSHKey | None
) -> None:
    """Write the keys then the config; put back what was there if anything fails."""
    keys = [(config.key_file, key)]
    if host_key is not None and config.host_key_file is not None:
        keys.append((config.host_key_file, host_key))
    before: list[tuple[Path, bytes | None]] = []
    try:
        for path, value in keys:
            data = value.export_private_key()
            old = path.read_bytes() if path.exists() else None
            if old != data:
                before.append((path, old))
                write_private(path, data)
        save_config(config, config_path)
    except BaseException:
        for path, old in reversed(before):
            if old is None:
                path.unlink(missing_ok=True)
            else:
                write_private(path, old)
        raise


def under_journald() -> bool:
    """Whether stderr is the journal stream systemd named in $JOURNAL_STREAM (it stamps lines)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):  # no real stderr (closed, or replaced)
        return False
    return f"{stat.st_dev}:{stat.st_ino}" == f"{device}:{inode}"


def cmd_run(args: argparse.Namespace) -> int:
    """Check in and hold the tunnel until SIGTERM or SIGINT."""
    from device_client.runner import run_client

    config_path = _config_path(args)
    config = load_config(config_path)
    cap = backoff_cap_from_env()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=LOG_FORMAT if under_journald() else f"%(asctime)s {LOG_FORMAT}",
        stream=sys.stderr,
    )
    if not args.verbose:  # per-connection and per-request chatter; state changes suffice
        logging.getLogger("asyncssh").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)
    return asyncio.run(run_client(config, config_path, cap))


def cmd_status(args: argparse.Namespace) -> int:
    """Print whether the client runs, its last check-in and its tunnel, one fact a line."""
    config_path = _config_path(args)
    report = status_report(load_config(config_path), config_path, ask_tracker=args.tracker)
    for line in report.lines:
        print(line)
    return 0 if report.tunnel_up else EXIT_NOT_RUNNING


def cmd_install_service(args: argparse.Namespace) -> int:
    """Write and enable rly-client.service (and the sshd CA drop-in)."""
    config_path = _config_path(args).absolute()
    config = load_config(config_path)
    for line in install_service(
        config,
        config_path,
        unit_dir=Path(args.unit_dir),
        dropin_dir=Path(args.sshd_dropin_dir),
        enable=not args.no_enable,
    ):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(
        prog="rly-client",
        description="rly device client: reverse SSH tunnel to an rly relay.",
        epilog=f"The config file defaults to ${CONFIG_ENV} or {default_config_path()}.",
    )
    parser.add_argument("--version", action="version", version=f"rly-client {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = f"config file (default: ${CONFIG_ENV} or /etc/rly/client.toml)"

    enroll = sub.add_parser("enroll", help="register this device with a tracker")
    enroll.add_argument("--tracker", required=True, help="tracker URL, e.g. https://rly.example")
    enroll.add_argument("--token", required=True, help="enrollment token from the portal")
    enroll.add_argument("--config", help=config_help)
    enroll.add_argument(
        "--target",
        choices=TARGETS,
        default="sshd",
        help="what technicians reach: the local sshd or a builtin PTY shell",
    )
    enroll.add_argument("--hostname", help="hostname to report (default: this host's)")
    enroll.add_argument("--serial", help="serial to report (default: DMI serial or machine id)")
    enroll.add_argument("--target-host", default="127.0.0.1", help="sshd address")
    enroll.add_argument("--target-port", type=int, default=22, help="sshd port (default 22)")
    enroll.add_argument(
        "--ca-file",
        help="pin this CA (or the tracker's own certificate, PEM) for HTTPS and WSS",
    )
    enroll.add_argument(
        "--tracker-fingerprint",
        help="pin the tracker's TLS certificate by fingerprint (SHA256:..., from rly)",
    )
    enroll.add_argument(
        "--proxy",
        help="HTTP CONNECT proxy, http://[user:pass@]host:port (default: $HTTPS_PROXY)",
    )
    enroll.add_argument(
        "--key-file", help="device key (default: CONFIG-NAME.key next to the config file)"
    )
    enroll.add_argument(
        "--new-key",
        action="store_true",
        help="replace this config's existing key files with fresh keys (a new device)",
    )
    enroll.set_defaults(func=cmd_enroll)

    run = sub.add_parser(
        "run",
        help="check in and hold the tunnel (what the service runs)",
        epilog=f"${BACKOFF_CAP_ENV} lowers the 60 s reconnect backoff cap (for tests).",
    )
    run.add_argument("--config", help=config_help)
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="is the client running, checked in, tunnelled?")
    status.add_argument("--config", help=config_help)
    status.add_argument(
        "--tracker", action="store_true", help="also ask the tracker for this device's status"
    )
    status.set_defaults(func=cmd_status)

    install = sub.add_parser("install-service", help="install and enable rly-client.service")
    install.add_argument("--config", help=config_help)
    install.add_argument("--unit-dir", default="/etc/systemd/system")
    install.add_argument("--sshd-dropin-dir", default="/etc/ssh/sshd_config.d")
    install.add_argument(
        "--no-enable", action="store_true", help="only write files; run no systemctl command"
    )
    install.set_defaults(func=cmd_install_service)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except (CliError, *_ERRORS) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"rly-client: {message}", file=sys.stderr)
        return EXIT_ERROR
    return result


if __name__ == "__main__":
    sys.exit(main())
