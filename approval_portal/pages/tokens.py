"""Enrollment tokens (admins): create one and copy its install command once, list, revoke.

Creation is `core.devices.create_enroll_token`, the same rules and audit row
as `rly enroll-token create`. The token is shown only in the answer to the
POST that made it (never stored, never in a URL, pages are no-store).
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from approval_portal.auth import Viewer
from approval_portal.context import Portal, PortalDep
from approval_portal.deps import AdminPostViewer, AdminViewer
from approval_portal.security import client_ip
from core import devices, enroll_tokens
from core.config import parse_duration
from core.models import Account, EnrollToken
from core.validate import InvalidInput

router = APIRouter()
RESUBMITTED = (
    "This form was already used: its token exists (its command was shown once). "
    "Revoke it below if the command was lost, and create a new one."
)
MAX_USES = 10_000
MAX_TTL = 366 * 86400.0


def _page(
    request: Request,
    portal: Portal,
    viewer: Viewer,
    *,
    error: str = "",
    created: dict[str, str] | None = None,
    status: int = 200,
) -> Response:
    with portal.sessions() as session:
        rows = enroll_tokens.list_tokens(
            session, account_id=None if viewer.is_superadmin else viewer.account_id
        )
        names = (
            list(session.scalars(select(Account.name).order_by(Account.name)))
            if viewer.is_superadmin
            else [viewer.account_name]
        )
    context = {
        "rows": rows,
        "accounts": names,
        "error": error,
        "created": created,
        "nonce": secrets.token_urlsafe(16),
    }
    return portal.render(request, "tokens.html", context, status_code=status)


@router.get("/tokens")
def tokens_page(request: Request, portal: PortalDep, viewer: AdminViewer) -> Response:
    return _page(request, portal, viewer)


def _account_id(portal: Portal, viewer: Viewer, name: str) -> int:
    if not viewer.is_superadmin or not name or name == viewer.account_name:
        return viewer.account_id
    with portal.sessions() as session:
        account_id = session.scalar(select(Account.id).where(Account.name == name[:64]))
    if account_id is None:
        raise InvalidInput(f"account {name!r} does not exist")
    return account_id


def _uses(text: str) -> int:
    try:
        uses = int(text.strip() or "1")
    except ValueError:
        raise InvalidInput("uses must be a whole number") from None
    if uses > MAX_USES:
        raise InvalidInput(f"uses must be at most {MAX_USES}")
    return uses


def _ttl(text: str) -> float:
    try:
        ttl = parse_duration(text or "24h")
    except ValueError as exc:
        raise InvalidInput(f"valid for: {exc}") from None
    if ttl > MAX_TTL:
        raise InvalidInput("valid for: at most 366 days")
    return ttl


@router.post("/tokens")
def create_token(
    request: Request,
    portal: PortalDep,
    viewer: AdminPostViewer,
    account: Annotated[str, Form(max_length=64)] = "",
    auto_accept: Annotated[str, Form(max_length=8)] = "",
    uses: Annotated[str, Form(max_length=16)] = "1",
    ttl: Annotated[str, Form(max_length=32)] = "24h",
    nonce: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    try:
        account_id = _account_id(portal, viewer, account)
        count, seconds = _uses(uses), _ttl(ttl)
        with portal.sessions() as session, session.begin():
            if nonce and session.scalar(
                select(EnrollToken.id).where(EnrollToken.form_nonce == nonce)
            ):
                raise InvalidInput(RESUBMITTED)
            token = devices.create_enroll_token(
                session,
                account_id=account_id,
                auto_accept=auto_accept == "yes",
                uses=count,
                ttl=seconds,
                actor=viewer.username,
            )
            if nonce:
                row = session.scalars(
                    select(EnrollToken).where(EnrollToken.token_hash == devices.token_hash(token))
                ).one()
                row.form_nonce = nonce  # unique: of two racing resubmissions one commits
    except InvalidInput as exc:
        status = 409 if str(exc) == RESUBMITTED else 400
        return _page(request, portal, viewer, error=str(exc).replace("--", ""), status=status)
    except IntegrityError:
        return _page(request, portal, viewer, error=RESUBMITTED, status=409)
    tracker = portal.settings.http.public_url.rstrip("/")
    created = {
        "command": enroll_tokens.install_command(tracker, token, portal.settings.http.tls_cert),
        "summary": f"{count} use{'s' if count != 1 else ''}, valid for {ttl or '24h'}, "
        + ("auto-accept" if auto_accept == "yes" else "devices wait for acceptance"),
    }
    return _page(request, portal, viewer, created=created)


@router.post("/tokens/{token_id}/revoke")
def revoke_token(
    request: Request, token_id: int, portal: PortalDep, viewer: AdminPostViewer
) -> Response:
    try:
        with portal.sessions() as session, session.begin():
            enroll_tokens.revoke_token(
                session,
                token_id=token_id,
                account_id=None if viewer.is_superadmin else viewer.account_id,
                actor=viewer.username,
                source_ip=client_ip(request),
            )
    except InvalidInput as exc:
        return _page(request, portal, viewer, error=str(exc), status=400)
    return RedirectResponse("/tokens", status_code=303)
