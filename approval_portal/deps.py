"""Typed dependencies: who is asking, and is this POST really from our own form.

Every state-changing route takes `PostViewer` (login + CSRF check) so none can
forget the check; pages take `PageViewer` (login, else a redirect to /login).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import Response

from approval_portal.auth import Viewer, load_viewer
from approval_portal.context import Portal, PortalDep
from approval_portal.security import same_token


class LoginRequired(Exception):
    """No live, fully logged-in session; GET pages redirect to /login."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class Forbidden(Exception):
    """A 403 with one sentence for the page."""


def cookie_names(portal: Portal) -> tuple[str, str]:
    """(session cookie, login-form CSRF cookie); __Host- pins them to this origin over https."""
    prefix = "__Host-" if portal.secure else ""
    return f"{prefix}rly_session", f"{prefix}rly_login"


def set_cookie(portal: Portal, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        secure=portal.secure,
        httponly=True,
        samesite="strict",
    )


def clear_cookie(portal: Portal, response: Response, name: str) -> None:
    response.delete_cookie(name, path="/", secure=portal.secure, httponly=True, samesite="strict")


def any_viewer(request: Request, portal: PortalDep) -> Viewer | None:
    """The session behind the cookie, even a password-only (enrolment) one."""
    viewer = load_viewer(portal, request.cookies.get(cookie_names(portal)[0], ""))
    if viewer is not None and viewer.totp_ok:
        request.state.viewer = viewer
    return viewer


def optional_viewer(viewer: Annotated[Viewer | None, Depends(any_viewer)]) -> Viewer | None:
    return viewer if viewer is not None and viewer.totp_ok else None


def page_viewer(
    request: Request, viewer: Annotated[Viewer | None, Depends(optional_viewer)]
) -> Viewer:
    if viewer is None:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(path)
    return viewer


async def csrf_checked(request: Request, viewer: Viewer | None) -> Viewer:
    if viewer is None:
        raise Forbidden("You are not logged in (or your session ended); log in and try again.")
    form = await request.form()
    given = form.get("csrf")
    if not isinstance(given, str) or not same_token(given, viewer.csrf):
        raise Forbidden("This form expired or did not come from this site; reload and try again.")
    return viewer


async def post_viewer(
    request: Request, viewer: Annotated[Viewer | None, Depends(optional_viewer)]
) -> Viewer:
    """A fully logged-in user whose form carries this session's CSRF token (else 403)."""
    return await csrf_checked(request, viewer)


async def enrol_viewer(
    request: Request, viewer: Annotated[Viewer | None, Depends(any_viewer)]
) -> Viewer:
    """Like post_viewer, but a password-only session counts (it is what enrolment needs)."""
    return await csrf_checked(request, viewer)


def admin_viewer(viewer: Annotated[Viewer, Depends(page_viewer)]) -> Viewer:
    if not viewer.is_admin:
        raise Forbidden("This page is for account admins.")
    return viewer


async def admin_post_viewer(viewer: Annotated[Viewer, Depends(post_viewer)]) -> Viewer:
    if not viewer.is_admin:
        raise Forbidden("Only account admins may do this.")
    return viewer


AnyViewer = Annotated[Viewer | None, Depends(any_viewer)]
OptionalViewer = Annotated[Viewer | None, Depends(optional_viewer)]
PageViewer = Annotated[Viewer, Depends(page_viewer)]
PostViewer = Annotated[Viewer, Depends(post_viewer)]
EnrolViewer = Annotated[Viewer, Depends(enrol_viewer)]
AdminViewer = Annotated[Viewer, Depends(admin_viewer)]
AdminPostViewer = Annotated[Viewer, Depends(admin_post_viewer)]
