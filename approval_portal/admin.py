"""The allowlist page; admins change it by POST only.

Devices and sessions live in approval_portal.pages; the data changes are
core.devices functions (which audit); this module checks who may do them.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from approval_portal import queries
from approval_portal.auth import Viewer
from approval_portal.context import Portal, PortalDep
from approval_portal.deps import AdminPostViewer, AdminViewer
from core import devices
from core.validate import InvalidInput, strip_controls

router = APIRouter()
Field = Annotated[str, Form(max_length=256)]


def _allowlist_page(
    request: Request, portal: Portal, viewer: Viewer, error: str = "", status: int = 200
) -> Response:
    with portal.sessions() as session:
        rows = queries.allowlist(session, viewer.account_id)
    return portal.render(
        request, "allowlist.html", {"rows": rows, "error": error}, status_code=status
    )


@router.get("/allowlist")
def allowlist_page(request: Request, portal: PortalDep, viewer: AdminViewer) -> Response:
    return _allowlist_page(request, portal, viewer)


@router.post("/allowlist/{action}")
def allowlist_change(
    request: Request,
    action: str,
    portal: PortalDep,
    viewer: AdminPostViewer,
    cidr: Field = "",
    comment: Field = "",
) -> Response:
    if action not in ("add", "remove"):
        return portal.message(request, "Not found", "No such allowlist action.", status_code=404)
    try:
        with portal.sessions() as session, session.begin():
            if action == "add":
                devices.add_allowlist(
                    session,
                    account_id=viewer.account_id,
                    cidr=cidr,
                    actor=viewer.username,
                    comment=strip_controls(comment)[:256],
                )
            else:
                devices.remove_allowlist(
                    session, account_id=viewer.account_id, cidr=cidr, actor=viewer.username
                )
    except InvalidInput as exc:
        return _allowlist_page(request, portal, viewer, str(exc), 400)
    return RedirectResponse("/allowlist", status_code=303)
