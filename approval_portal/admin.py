"""Devices, sessions, audit and allowlist pages; admins change things by POST only.

The data changes themselves are core.devices functions (which audit); this
module checks who may do them, and wakes the relay for a revoked device.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from approval_portal import queries
from approval_portal.auth import Viewer
from approval_portal.context import Portal, PortalDep
from approval_portal.deps import AdminPostViewer, AdminViewer, PageViewer
from approval_portal.security import client_ip
from core import devices
from core.validate import InvalidInput, strip_controls

router = APIRouter()
Field = Annotated[str, Form(max_length=256)]


def _devices_page(
    request: Request, portal: Portal, viewer: Viewer, error: str = "", status: int = 200
) -> Response:
    with portal.sessions() as session:
        rows = queries.device_rows(session, viewer)
    return portal.render(
        request, "devices.html", {"rows": rows, "error": error}, status_code=status
    )


@router.get("/devices")
def devices_page(request: Request, portal: PortalDep, viewer: PageViewer) -> Response:
    return _devices_page(request, portal, viewer)


@router.post("/devices/{device_id}/{action}")
def device_action(
    request: Request, device_id: str, action: str, portal: PortalDep, viewer: AdminPostViewer
) -> Response:
    if action not in ("accept", "revoke"):
        return portal.message(request, "Not found", "No such device action.", status_code=404)
    change = devices.accept_device if action == "accept" else devices.revoke_device
    try:
        with portal.sessions() as session, session.begin():
            if queries.visible_device(session, viewer, device_id) is None:
                raise InvalidInput("no such device in your account")
            change(
                session, device_id=device_id, actor=viewer.username, source_ip=client_ip(request)
            )
    except InvalidInput as exc:
        return _devices_page(request, portal, viewer, str(exc), 400)
    portal.hub.notify(f"device:{device_id}")
    return RedirectResponse("/devices", status_code=303)


@router.get("/sessions")
def sessions_page(request: Request, portal: PortalDep, viewer: PageViewer) -> Response:
    with portal.sessions() as session:
        rows = queries.ssh_sessions(session, viewer)
    return portal.render(request, "sessions.html", {"rows": rows})


@router.get("/audit")
def audit_page(request: Request, portal: PortalDep, viewer: AdminViewer) -> Response:
    with portal.sessions() as session:
        rows = queries.audit_events(session, viewer)
    return portal.render(request, "audit.html", {"rows": rows})


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
