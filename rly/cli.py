"""The `rly` command: `serve`, `db upgrade` and the admin commands."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from core.config import ConfigError, Settings, load_settings
from core.db import DatabaseError
from core.keys import KeyFileError
from core.logs import setup_logging
from core.text import printable, printable_output
from core.validate import InvalidInput
from rly import admin


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (default: none)")
    parser.add_argument("--data-dir", type=Path, help="override data_dir")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rly", description="OTP-gated SSH jump relay")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run relay, tracker and portal")
    _common(serve)
    serve.add_argument(
        "--only",
        type=_parts,
        metavar="PARTS",
        help="relay, tracker, portal or a list: tracker,portal",
    )

    dbp = sub.add_parser("db", help="database maintenance")
    dbsub = dbp.add_subparsers(dest="db_command", required=True)
    _common(dbsub.add_parser("upgrade", help="apply migrations"))
    admin.add_admin_parsers(sub, _common)
    return parser


def _parts(text: str) -> set[str]:
    """`--only relay` or `--only tracker,portal`: the parts this process runs."""
    parts = {p.strip() for p in text.split(",") if p.strip()}
    unknown = parts - {"relay", "tracker", "portal"}
    if not parts or unknown:
        raise argparse.ArgumentTypeError(f"unknown part {', '.join(sorted(unknown)) or text!r}")
    return parts


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, data_dir=args.data_dir)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.umask(0o077)  # the data dir holds keys and TOTP secrets: nothing we create is shared
    try:
        settings = settings_from(args)
        setup_logging(settings.log_level if args.command == "serve" else "warning")
        if args.command == "serve":
            return _serve(settings, args.only)
        if args.command == "db":
            return _db_upgrade(settings)
        with printable_output():  # stored text reaches the terminal escaped (core.text)
            return admin.run(args, settings)
    except (ConfigError, KeyFileError, DatabaseError, InvalidInput) as exc:
        print(f"rly: {printable(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C at a prompt or mid-command: one line, nothing changed
        print("rly: interrupted", file=sys.stderr)
        return 130


def _db_upgrade(settings: Settings) -> int:
    from core.db import applied_between, upgrade
    from core.keys import ensure_private_dir

    if not settings.database_url:  # the embedded database lives in the (private) data dir
        ensure_private_dir(settings.data_dir)
    before, after = upgrade(settings.effective_database_url)
    applied = applied_between(before, after)
    if applied:
        print(f"rly: applied migrations {', '.join(applied)}; the database is at schema {after}")
    else:
        print(f"rly: database is up to date (schema {after})")
    return 0


def _serve(settings: Settings, only: set[str] | None) -> int:
    from rly.serve import PARTS, StartupError, prepare, serve

    parts = only or set(PARTS)
    try:
        prepared = prepare(settings)
        return asyncio.run(serve(prepared, parts))
    except StartupError as exc:
        print(f"rly: {exc}", file=sys.stderr)
        return 2
