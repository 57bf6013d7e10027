"""Admin commands: each opens the database, changes one thing, audits it."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import segno
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import accounts, devices, enroll_tokens, totp
from core.config import Settings, parse_duration, with_bound_http_port
from core.db import check_connection, make_engine, make_sessions, upgrade
from core.keys import ensure_private_dir
from core.models import Account, AuditEvent, Device, utcnow
from core.validate import InvalidInput, strip_controls
from rly import console_admin, fleet_admin

ACTOR = "cli"
Common = Callable[[argparse.ArgumentParser], None]


def add_admin_parsers(sub: Any, common: Common) -> None:
    def group(name: str, help_: str) -> Any:
        return sub.add_parser(name, help=help_).add_subparsers(dest="action", required=True)

    acc = group("account", "accounts (tenants)")
    p = acc.add_parser("add")
    p.add_argument("name")
    common(p)
    common(acc.add_parser("list"))

    usr = group("user", "portal users")
    p = usr.add_parser("add")
    p.add_argument("username")
    p.add_argument("--account", required=True)
    p.add_argument("--role", choices=accounts.ROLES, default="technician")
    p.add_argument("--password-stdin", action="store_true")
    common(p)
    p = usr.add_parser("add-key")
    p.add_argument("username")
    p.add_argument("pubkey_file")
    common(p)

    tok = group("enroll-token", "device enrollment tokens")
    p = tok.add_parser("create")
    p.add_argument("--account", required=True)
    p.add_argument("--auto-accept", action="store_true")
    p.add_argument("--uses", type=int, default=1)
    p.add_argument("--ttl", default="24h")
    common(p)

    dev = group("device", "devices")
    p = dev.add_parser("list")
    p.add_argument("--account")
    common(p)
    for name in ("accept", "revoke"):
        p = dev.add_parser(name)
        p.add_argument("id")
        common(p)

    alw = group("allowlist", "per-account IP allowlist for device tunnels")
    for name in ("add", "remove"):
        p = alw.add_parser(name)
        p.add_argument("cidr")
        p.add_argument("--account", required=True)
        common(p)
    p = alw.add_parser("list")
    p.add_argument("--account", required=True)
    common(p)

    p = sub.add_parser("audit", help="print audit events")
    p.add_argument("--since", default="24h")
    p.add_argument("--limit", type=int, default=1000)
    common(p)
    console_admin.add_parsers(sub, acc, p, common)
    fleet_admin.add_parsers(sub, dev, common)


def open_sessions(settings: Settings) -> Any:
    url = settings.effective_database_url
    if not settings.database_url:
        ensure_private_dir(settings.data_dir)
    engine = make_engine(url)
    check_connection(engine)
    if url.startswith("sqlite"):
        upgrade(url)
    return make_sessions(engine)


def run(args: argparse.Namespace, settings: Settings) -> int:
    key = (args.command, getattr(args, "action", None))
    handler: console_admin.Handler = (
        HANDLERS.get(key) or fleet_admin.HANDLERS.get(key) or console_admin.HANDLERS[key]
    )
    sessions = open_sessions(settings)
    with sessions() as session, session.begin():
        status = handler(session, args, settings)
    return status or 0


def _account_add(session: Session, args: argparse.Namespace, _s: Settings) -> None:
    account = accounts.add_account(session, name=args.name, actor=ACTOR)
    print(f"account {account.name} added")


def _account_list(session: Session, _a: argparse.Namespace, _s: Settings) -> None:
    for account in session.scalars(select(Account).order_by(Account.name)):
        print(account.name)


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = _prompt("Password: ")
    if _prompt("Repeat password: ") != first:
        raise InvalidInput("passwords do not match")
    return first


def _prompt(text: str) -> str:
    """A hidden prompt; Ctrl-D (end of input) or Ctrl-C gives one line, not a traceback."""
    try:
        return getpass.getpass(text)
    except EOFError:
        print(file=sys.stderr)  # end the prompt's line, so the refusal stands on its own
        raise InvalidInput("no password given (end of input at the prompt)") from None
    except KeyboardInterrupt:
        print(file=sys.stderr)  # the same for Ctrl-C; rly.cli prints the one line
        raise


def _user_add(session: Session, args: argparse.Namespace, _s: Settings) -> None:
    password = _read_password(args)
    user = accounts.add_user(
        session,
        username=args.username,
        account_name=args.account,
        role=args.role,
        password=password,
        actor=ACTOR,
    )
    uri = totp.provisioning_uri(user.totp_secret, user.username)
    print(f"user {user.username} added to account {args.account} as {user.role}")
    print("Scan this with an authenticator app (or enter the URI):")
    print(uri)
    segno.make(uri, error="m").terminal(compact=True)


def _user_add_key(session: Session, args: argparse.Namespace, _s: Settings) -> None:
    try:
        with open(args.pubkey_file, encoding="utf-8") as handle:
            text = handle.read(16384)
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {args.pubkey_file}: {exc}") from None
    row = accounts.add_user_key(session, username=args.username, key_text=text, actor=ACTOR)
    print(f"key {row.fingerprint} added to {args.username}")


def _token_create(session: Session, args: argparse.Namespace, settings: Settings) -> None:
    account = accounts.get_account(session, args.account)
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        raise InvalidInput(f"--ttl: {exc}") from None
    token = devices.create_enroll_token(
        session,
        account_id=account.id,
        auto_accept=args.auto_accept,
        uses=args.uses,
        ttl=ttl,
        actor=ACTOR,
    )
    print(f"token {token}")
    print(
        f"expires in {args.ttl}, {args.uses} use(s), "
        f"{'auto-accept' if args.auto_accept else 'devices wait for acceptance'}"
    )
    print("install command:")
    tracker = with_bound_http_port(settings, settings.http.port).http.public_url
    command = enroll_tokens.install_command(tracker, token, settings.http.tls_cert)
    print(f"  {command}")  # the portal shows the same line


def _device_list(session: Session, args: argparse.Namespace, _s: Settings) -> None:
    query = select(Device, Account.name).join(Account).order_by(Account.name, Device.hostname)
    if args.account:
        query = query.where(Account.id == accounts.get_account(session, args.account).id)
    rows = [("ID", "STATUS", "ACCOUNT", "HOSTNAME", "SERIAL", "LAST CHECK-IN", "FINGERPRINT")]
    for device, account_name in session.execute(query):
        seen = (
            device.last_checkin_at.strftime("%Y-%m-%d %H:%M:%S")
            if device.last_checkin_at
            else "never"
        )
        rows.append(
            (
                device.id,
                _state(session, device),
                account_name,
                strip_controls(device.hostname),
                strip_controls(device.serial) or "-",
                seen,
                device.key_fingerprint,
            )
        )
    # Every value whole (columns as wide as the widest), so each can be pasted into a command.
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print(" ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]))


def _state(session: Session, device: Device) -> str:
    from core.models import Tunnel

    if device.status != "accepted":
        return device.status
    transport = session.scalar(
        select(Tunnel.transport).where(Tunnel.device_id == device.id, Tunnel.closed_at.is_(None))
    )
    return f"online ({transport})" if transport is not None else "offline"


def _device_accept(session: Session, args: argparse.Namespace, _s: Settings) -> None:
    devices.accept_device(session, device_id=args.id, actor=ACTOR)
    print(f"device {args.id} accepted")


def _device_revoke(session: Session, args: argparse.Namespace, _s: Settings) -> None:
    devices.revoke_device(session, device_id=args.id, actor=ACTOR)
    print(f"device {args.id} revoked")


def _allow_add(session: Session, args: argparse.Namespace, _s: Settings) -> None:
    account = accounts.get_account(session, args.account)
    entry = devices.add_allowlist(session, account_id=account.id, cidr=args.cidr, actor=ACTOR)
    print(f"{entry.cidr} added to the allowlist of {account.name}")


def _allow_remove(session: Session, args: argparse.Namespace, _s: Settings) -> None:
    account = accounts.get_account(session, args.account)
    devices.remove_allowlist(session, account_id=account.id, cidr=args.cidr, actor=ACTOR)
    print(f"{devices.parse_cidr(args.cidr)} removed from the allowlist of {account.name}")


def _allow_list(session: Session, args: argparse.Namespace, _s: Settings) -> None:
    account = accounts.get_account(session, args.account)
    cidrs = devices.allowlist_for(session, account.id)
    print("\n".join(cidrs) if cidrs else "(empty: every address may connect)")


def _audit(session: Session, args: argparse.Namespace, _s: Settings) -> None:
    """The newest `--limit` events of the window, printed oldest first (as a log reads)."""
    try:
        since = utcnow() - timedelta(seconds=parse_duration(args.since))
    except ValueError as exc:
        raise InvalidInput(f"--since: {exc}") from None
    if args.limit < 1:
        raise InvalidInput(f"--limit must be at least 1, got {args.limit}")
    newest = session.scalars(
        select(AuditEvent)
        .where(AuditEvent.at >= since)
        .order_by(AuditEvent.id.desc())
        .limit(args.limit)
    ).all()
    for ev in reversed(newest):
        print(
            f"{ev.at:%Y-%m-%d %H:%M:%S} {ev.action:<24} actor={ev.actor or '-'} "
            f"target={strip_controls(ev.target) or '-'} from={ev.source_ip or '-'} "
            f"{strip_controls(ev.detail)}".rstrip()
        )


HANDLERS: dict[tuple[str, str | None], Callable[[Session, argparse.Namespace, Settings], None]] = {
    ("account", "add"): _account_add,
    ("account", "list"): _account_list,
    ("user", "add"): _user_add,
    ("user", "add-key"): _user_add_key,
    ("enroll-token", "create"): _token_create,
    ("device", "list"): _device_list,
    ("device", "accept"): _device_accept,
    ("device", "revoke"): _device_revoke,
    ("allowlist", "add"): _allow_add,
    ("allowlist", "remove"): _allow_remove,
    ("allowlist", "list"): _allow_list,
    ("audit", None): _audit,
}
