"""`rly audit verify`, `rly approve CODE` and `rly account set NAME --second-approver on|off`.

Kept apart from rly.admin so the console commands (issue 13) do not crowd it;
rly.admin registers these parsers and looks handlers up here. A handler may
return an exit status (verify: 1 when the chain is broken).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from core import approvals
from core.audit_verify import verify
from core.config import Settings
from core.validate import InvalidInput

ACTOR = "cli"
Common = Callable[[argparse.ArgumentParser], None]
Handler = Callable[[Session, argparse.Namespace, Settings], int | None]


def add_parsers(sub: Any, account_group: Any, audit_parser: Any, common: Common) -> None:
    """The console commands, on the parsers rly.admin already made."""
    p = account_group.add_parser("set", help="change an account's settings")
    p.add_argument("name")
    p.add_argument(
        "--second-approver",
        choices=("on", "off"),
        required=True,
        help="on: a key login must be approved by someone other than the key's owner",
    )
    common(p)

    audit_sub = audit_parser.add_subparsers(dest="action")
    common(audit_sub.add_parser("verify", help="check the audit hash chain"))

    p = sub.add_parser("approve", help="approve a waiting SSH login by its verification code")
    p.add_argument("code")
    p.add_argument("--user", help="the portal user a shared-login session acts as")
    common(p)


def _audit_verify(session: Session, _a: argparse.Namespace, _s: Settings) -> int:
    result = verify(session)
    print(result.line())
    return 0 if result.intact else 1


def _approve(session: Session, args: argparse.Namespace, _s: Settings) -> int:
    try:
        approval, acts_as = approvals.approve_by_code(
            session, code=args.code, username=args.user, actor=ACTOR
        )
    except approvals.ApprovalError as exc:
        raise InvalidInput(str(exc)) from None
    print(
        f"approved request {approval.code} ({approval.ssh_login} from {approval.client_ip}); "
        f"the session acts as {acts_as}"
    )
    return 0


def _account_set(session: Session, args: argparse.Namespace, _s: Settings) -> int:
    on = args.second_approver == "on"
    approvals.set_second_approver(session, account_name=args.name, on=on, actor=ACTOR)
    print(f"account {args.name}: second-person approval {'on' if on else 'off'}")
    return 0


HANDLERS: dict[tuple[str, str | None], Handler] = {
    ("audit", "verify"): _audit_verify,
    ("approve", None): _approve,
    ("account", "set"): _account_set,
}
