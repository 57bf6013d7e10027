"""Portal users of the account (admins): add, disable/enable, role, TOTP reset, SSH keys.

The changes are core.accounts / core.users functions: audited, scoped to the
admin's account, and never leaving the account without an active admin.
Disabling ends the user's portal sessions at once; a TOTP reset makes their
next login enrol a new authenticator.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select

from approval_portal.auth import Viewer
from approval_portal.context import Portal, PortalDep
from approval_portal.deps import AdminPostViewer, AdminViewer
from approval_portal.security import client_ip
from core import accounts, users
from core.accounts import ROLES
from core.models import User
from core.validate import InvalidInput

router = APIRouter()
ACTIONS = ("disable", "enable", "role", "reset-totp", "add-key", "remove-key")
DONE = {
    "disable": "User disabled; their portal sessions have ended.",
    "enable": "User enabled.",
    "role": "Role changed.",
    "reset-totp": "Authenticator reset: the next login sets up a new one.",
    "add-key": "SSH key added.",
    "remove-key": "SSH key removed.",
    "add": "User added: they log in with this password and set up their authenticator.",
}
Text = Annotated[str, Form(max_length=256)]


def _scope(viewer: Viewer) -> int | None:
    return None if viewer.is_superadmin else viewer.account_id


def _list_page(
    request: Request, portal: Portal, viewer: Viewer, *, error: str = "", status: int = 200
) -> Response:
    with portal.sessions() as session:
        query = select(User).order_by(User.username)
        if not viewer.is_superadmin:
            query = query.where(User.account_id == viewer.account_id)
        rows = list(session.scalars(query.limit(1000)))
    context = {"rows": rows, "roles": ROLES, "error": error}
    return portal.render(request, "users.html", context, status_code=status)


@router.get("/users")
def users_page(request: Request, portal: PortalDep, viewer: AdminViewer) -> Response:
    return _list_page(request, portal, viewer)


@router.post("/users")
def add_user(
    request: Request,
    portal: PortalDep,
    viewer: AdminPostViewer,
    username: Annotated[str, Form(max_length=64)] = "",
    role: Annotated[str, Form(max_length=16)] = "technician",
    password: Annotated[str, Form(max_length=1024)] = "",
) -> Response:
    try:
        with portal.sessions() as session, session.begin():
            user = accounts.add_user(
                session,
                username=username.strip(),
                account_name=viewer.account_name,
                role=role,
                password=password,
                actor=viewer.username,
            )
            name = user.username
    except InvalidInput as exc:
        return _list_page(request, portal, viewer, error=str(exc), status=400)
    return RedirectResponse(f"/users/{name}?done=add", status_code=303)


def _user_page(
    request: Request,
    portal: Portal,
    viewer: Viewer,
    username: str,
    *,
    error: str = "",
    done: str = "",
    status: int = 200,
) -> Response:
    with portal.sessions() as session:
        try:
            user = users.account_user(session, account_id=_scope(viewer), username=username)
        except InvalidInput as exc:
            return portal.message(request, "Unknown user", str(exc), status_code=404)
        keys = users.user_keys(session, user.id)
    context = {
        "user": user,
        "keys": keys,
        "roles": ROLES,
        "error": error,
        "done": DONE.get(done, ""),
    }
    return portal.render(request, "user.html", context, status_code=status)


@router.get("/users/{username}")
def user_page(
    request: Request, username: str, portal: PortalDep, viewer: AdminViewer, done: str = ""
) -> Response:
    return _user_page(request, portal, viewer, username, done=done[:16])


@router.post("/users/{username}/{action}")
def user_action(
    request: Request,
    username: str,
    action: str,
    portal: PortalDep,
    viewer: AdminPostViewer,
    role: Annotated[str, Form(max_length=16)] = "",
    key: Annotated[str, Form(max_length=16384)] = "",
    key_id: Annotated[int, Form()] = 0,
) -> Response:
    if action not in ACTIONS:
        return portal.message(request, "Not found", "No such user action.", status_code=404)
    ip, actor = client_ip(request), viewer.username
    closing: list[str] = []
    try:
        with portal.sessions() as session, session.begin():
            user = users.account_user(session, account_id=_scope(viewer), username=username)
            if user.is_superadmin and not viewer.is_superadmin:
                raise InvalidInput("only a superadmin may change a superadmin")
            if action in ("disable", "enable"):
                closing = users.set_disabled(
                    session, user=user, disabled=action == "disable", actor=actor, source_ip=ip
                )
            elif action == "role":
                users.set_role(session, user=user, role=role, actor=actor, source_ip=ip)
            elif action == "reset-totp":
                users.reset_totp(session, user=user, actor=actor, source_ip=ip)
            elif action == "add-key":
                accounts.add_user_key(session, username=user.username, key_text=key, actor=actor)
            else:
                users.remove_key(session, user=user, key_id=key_id, actor=actor, source_ip=ip)
            name = user.username
    except InvalidInput as exc:
        return _user_page(request, portal, viewer, username, error=str(exc), status=400)
    for session_id in closing:  # after the commit, like the sessions page's terminate
        portal.hub.notify(f"session:{session_id}")
    return RedirectResponse(f"/users/{name}?done={action}", status_code=303)
