"""`rly-client`: enroll, run, status and install-service.

Every failure is one line on stderr and exit status 2; `status` exits 3 when
the client is not running with a tunnel up (like `systemctl status`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncssh

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
from device_client.runner import os_release
from device_client.state import pid_alive, read_state
from device_client.systemd import InstallError, install_service, service_active
from device_client.tunnel import BACKOFF_CAP_ENV, backoff_cap_from_env

EXIT_ERROR = 2
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


def _device_key(path: Path | None) -> asyncssh.SSHKey:
    """An existing key given with --key-file, else a fresh ed25519 key."""
    if path is not None and path.exists():
        return asyncssh.read_private_key(str(path))
    return asyncssh.generate_private_key("ssh-ed25519")


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
    async with TrackerClient(args.tracker) as tracker:
        return await tracker.enroll(body)


def cmd_enroll(args: argparse.Namespace) -> int:
    """Register this device with the tracker and write key + config files."""
    tracker_url = _check_tracker_url(args.tracker)
    config_path = _config_path(args)
    base = config_path.parent
    key_file = Path(args.key_file) if args.key_file else base / "device_key"
    if not 0 < args.target_port < 65536:
        raise CliError("--target-port must be between 1 and 65535")
    key = _device_key(Path(args.key_file) if args.key_file else None)
    host_key = asyncssh.generate_private_key("ssh-ed25519") if args.target == "builtin" else None
    reply = asyncio.run(_enroll_request(args, key, host_key))
    host_key_file = base / "builtin_host_key" if host_key else None
    config = config_from_dict(
        config_to_dict(
            ClientConfig(  # validates what the tracker sent
                tracker_url=tracker_url,
                device_id=reply.device_id,
                key_file=key_file,
                relay_hosts=tuple(reply.relay_hosts),
                relay_ports=tuple(reply.relay_ports),
                relay_host_ca=reply.relay_host_ca,
                user_ca=reply.user_ca,
                state_file=base / "state.json",
                login_user=reply.login_user,
                target=args.target,
                target_host=args.target_host,
                target_port=args.target_port,
                host_key_file=host_key_file,
                tunnel_mode=reply.tunnel_mode,
            )
        )
    )
    _write_enrollment(config, config_path, key, host_key)
    print(f"enrolled: device {reply.device_id}, status {reply.status}")
    if reply.status == "pending":
        print("an admin must accept this device in the portal before it can connect")
    print(f"config written to {config_path}")
    return 0


def _write_enrollment(
    config: ClientConfig, config_path: Path, key: asyncssh.SSHKey, host_key: asyncssh.SSHKey | None
) -> None:
    """Write the keys then the config; undo the new key files if anything fails."""
    written: list[Path] = []
    try:
        if not config.key_file.exists():
            write_private(config.key_file, key.export_private_key())
            written.append(config.key_file)
        if host_key is not None and config.host_key_file is not None:
            write_private(config.host_key_file, host_key.export_private_key())
            written.append(config.host_key_file)
        save_config(config, config_path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def cmd_run(args: argparse.Namespace) -> int:
    """Check in and hold the tunnel until SIGTERM or SIGINT."""
    from device_client.runner import run_client

    config_path = _config_path(args)
    config = load_config(config_path)
    cap = backoff_cap_from_env()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:  # per-connection and per-request chatter; state changes suffice
        logging.getLogger("asyncssh").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)
    return asyncio.run(run_client(config, config_path, cap))


def _ago(stamp: float | None) -> str:
    if stamp is None:
        return "never"
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(stamp))
    return f"{when} ({max(0, int(time.time() - stamp))}s ago)"


def cmd_status(args: argparse.Namespace) -> int:
    """Print whether the client runs, its last check-in and its tunnel."""
    config_path = _config_path(args)
    config = load_config(config_path)
    state = read_state(config.state_file)
    running = state is not None and state.stopped is None and pid_alive(state.pid)
    active = service_active()
    service = f"running (pid {state.pid})" if running and state else "not running"
    if active is not None:
        service += f"; systemd unit rly-client is {'active' if active else 'inactive'}"
    print(f"service:       {service}")
    known = state.device_status if state and state.device_status else "unknown"
    print(f"device:        {config.device_id} (status {known})")
    print(
        f"last check-in: {_ago(state.last_checkin if state else None)}"
        f"{': ' + state.checkin_result if state and state.checkin_result else ''}"
    )
    tunnel_up = running and state is not None and state.tunnel_state == "up"
    if tunnel_up and state:
        print(f"tunnel:        up via {state.relay}:{state.port} since {_ago(state.since)}")
    else:
        print(f"tunnel:        {state.tunnel_state if running and state else 'down'}")
    print(f"config:        {config_path}")
    if args.tracker:
        print(f"tracker:       {asyncio.run(_remote_status(config))}")
    return 0 if tunnel_up else EXIT_NOT_RUNNING


async def _remote_status(config: ClientConfig) -> dict[str, Any]:
    key = asyncssh.read_private_key(str(config.key_file))
    async with TrackerClient(config.tracker_url, device_id=config.device_id, key=key) as t:
        return await t.device_status()


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
    enroll.add_argument("--key-file", help="device key (default: next to the config file)")
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
