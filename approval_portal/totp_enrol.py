"""First-login TOTP enrolment: after the password, show the secret and confirm a code.

The user's secret (created with the user) is shown as an inline SVG QR code
and as text; only a valid, unused code (core.totp.consume_code) confirms it.
Confirming replaces the password-only session by a fresh full one, so a
cookie seen before enrolment is worthless after it.
"""

from __future__ import annotations

from typing import Annotated

import segno
from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from markupsafe import Markup

from approval_portal.auth import (
    Viewer,
    create_session,
    is_limited,
    note_failure,
    revoke_session,
)
from approval_portal.context import Portal, PortalDep
from approval_portal.deps import AnyViewer, EnrolViewer, cookie_names, set_cookie
from approval_portal.security import client_ip, safe_next
from core import audit, totp
from core.models import User

router = APIRouter()


def qr_svg(uri: str) -> Markup:
    """segno's SVG is built from the URI by segno itself, so it is safe to embed unescaped."""
    return Markup(segno.make(uri, error="m").svg_inline(scale=5, dark="#000", light="#fff"))  # noqa: S704


def _page(
    request: Request, portal: Portal, viewer: Viewer, target: str, error: str, status: int
) -> Response:
    with portal.sessions() as session:
        user = session.get(User, viewer.user_id)
        secret = user.totp_secret if user is not None else ""
    uri = totp.provisioning_uri(secret, viewer.username)
    context = {
        "qr": qr_svg(uri),
        "secret": secret,
        "csrf": viewer.csrf,
        "next": target,
        "error": error,
        "username": viewer.username,
    }
    return portal.render(request, "enrol.html", context, status_code=status)


@router.get("/enrol")
def enrol_page(request: Request, portal: PortalDep, viewer: AnyViewer, next: str = "/") -> Response:
    target = safe_next(next)
    if viewer is None:
        return RedirectResponse("/login", status_code=303)
    if viewer.totp_ok:
        return RedirectResponse(target, status_code=303)
    return _page(request, portal, viewer, target, "", 200)


@router.post("/enrol")
def enrol_submit(
    request: Request,
    portal: PortalDep,
    viewer: EnrolViewer,
    code: Annotated[str, Form(max_length=64)] = "",
    next: Annotated[str, Form(max_length=1024)] = "/",
) -> Response:
    target = safe_next(next)
    if viewer.totp_ok:
        return RedirectResponse(target, status_code=303)
    source = client_ip(request)
    if is_limited(portal, viewer.username, source):
        error = "Too many wrong codes; wait a few minutes and try again."
        return _page(request, portal, viewer, target, error, 429)
    with portal.sessions() as session, session.begin():
        user = session.get(User, viewer.user_id)
        if user is not None and totp.consume_code(session, user, code, now=portal.clock()):
            user.totp_confirmed = True
            revoke_session(session, viewer.session_id)
            token = create_session(
                session, user_id=user.id, totp_ok=True, ttl=portal.settings.portal.session_ttl
            )
            audit.record(
                session,
                action="portal.totp_enrolled",
                actor=user.username,
                account_id=user.account_id,
                target=f"user:{user.username}",
                source_ip=source,
            )
            response = RedirectResponse(target, status_code=303)
            ttl = int(portal.settings.portal.session_ttl)
            set_cookie(portal, response, cookie_names(portal)[0], token, ttl)
            return response
    note_failure(portal, viewer.username, source)
    error = "That code is not right (or was already used); wait for the next one."
    return _page(request, portal, viewer, target, error, 400)
