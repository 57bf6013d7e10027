"""Login and logout (the dashboard is approval_portal.pages.dashboard).

Login is one form (username, password, 6-digit code). A user who has not
enrolled TOTP yet leaves the code empty and is sent to /enrol after the
password. GET never changes anything; every POST carries the CSRF token.
"""

from __future__ import annotations

import secrets
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from approval_portal.auth import Outcome, login, revoke_session
from approval_portal.context import PortalDep
from approval_portal.deps import (
    AnyViewer,
    PostViewer,
    clear_cookie,
    cookie_names,
    set_cookie,
)
from approval_portal.security import client_ip, safe_next, same_token
from core import audit

router = APIRouter()
LOGIN_FORM_TTL = 3600
FormStr = Annotated[str, Form(max_length=4096)]


def _redirect(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303)


@router.get("/login")
def login_page(request: Request, portal: PortalDep, viewer: AnyViewer, next: str = "/") -> Response:
    """The login form; its CSRF token is a double-submit cookie (there is no session yet)."""
    target = safe_next(next)
    if viewer is not None:
        return _redirect(target if viewer.totp_ok else f"/enrol?{urlencode({'next': target})}")
    return _login_form(request, portal, target, error="", status_code=200)


def _login_form(
    request: Request, portal: PortalDep, target: str, *, error: str, status_code: int
) -> Response:
    token = secrets.token_urlsafe(32)
    response = portal.render(
        request,
        "login.html",
        {"next": target, "csrf": token, "error": error},
        status_code=status_code,
    )
    set_cookie(portal, response, cookie_names(portal)[1], token, LOGIN_FORM_TTL)
    return response


@router.post("/login")
def login_submit(
    request: Request,
    portal: PortalDep,
    username: FormStr = "",
    password: FormStr = "",
    code: FormStr = "",
    csrf: FormStr = "",
    next: FormStr = "/",
) -> Response:
    target = safe_next(next)
    session_cookie, login_cookie = cookie_names(portal)
    if not same_token(csrf, request.cookies.get(login_cookie, "")):
        return portal.message(
            request,
            "Login form expired",
            "This login form expired or did not come from this site; reload and try again.",
            status_code=403,
        )
    outcome, token = login(
        portal, username=username, password=password, code=code, source_ip=client_ip(request)
    )
    if outcome is Outcome.LIMITED:
        error = "Too many failed logins; wait a few minutes and try again."
        return _login_form(request, portal, target, error=error, status_code=429)
    if outcome is Outcome.FAILED:
        error = "The username, password or code is not right."
        return _login_form(request, portal, target, error=error, status_code=401)
    if outcome is Outcome.ENROL:
        response = _redirect(f"/enrol?{urlencode({'next': target})}")
        max_age = 600
    else:
        response = _redirect(target)
        max_age = int(portal.settings.portal.session_ttl)
    set_cookie(portal, response, session_cookie, token, max_age)
    clear_cookie(portal, response, login_cookie)
    return response


@router.post("/logout")
def logout(request: Request, portal: PortalDep, viewer: PostViewer) -> Response:
    """Revoke the session row, so the old cookie is worthless even if kept."""
    with portal.sessions() as session, session.begin():
        revoke_session(session, viewer.session_id)
        audit.record(
            session,
            action="portal.logout",
            actor=viewer.username,
            account_id=viewer.account_id,
            target=f"user:{viewer.username}",
            source_ip=client_ip(request),
        )
    response = _redirect("/login")
    clear_cookie(portal, response, cookie_names(portal)[0])
    return response
