"""Devices: the searchable, filtered, paged list and one device's page with its actions.

Actions are admin POSTs: accept (the page shows the key fingerprint next to
the button), revoke (only from a confirmation form, so it works without
JavaScript and cannot be one stray click), repair, close tunnel, tunnel mode.
The changes are core functions (audited); the hub wakes this process's relay
and tracker at once, core.feed the others.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import RedirectResponse, Response

from approval_portal.auth import Viewer
from approval_portal.context import Portal, PortalDep
from approval_portal.deps import AdminPostViewer, PageViewer
from approval_portal.pages import device_queries as q
from approval_portal.security import client_ip
from core import device_ops, devices
from core.validate import InvalidInput

router = APIRouter()
ACTIONS = ("accept", "revoke", "repair", "close-tunnel", "tunnel-mode")
DONE = {
    "accept": "Device accepted.",
    "revoke": "Device revoked; its tunnel is dropped.",
    "repair": "Asked the device to reconnect its tunnel.",
    "close-tunnel": "Asked the relay to close the device's tunnel.",
    "tunnel-mode": "Tunnel mode saved; the device is told on its next check-in.",
}


@router.get("/devices")
def device_list(
    request: Request,
    portal: PortalDep,
    viewer: PageViewer,
    q_: Annotated[str, Query(alias="q", max_length=128)] = "",
    state: Annotated[str, Query(max_length=16)] = "",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    relay: Annotated[str, Query(max_length=64)] = "",
) -> Response:
    state = state if state in q.STATES else ""
    with portal.sessions() as session:
        rows, total = q.device_page(session, viewer, search=q_, state=state, page=page, relay=relay)
    pages = max(1, -(-total // q.PAGE_SIZE))

    def link(n: int) -> str:
        params = {k: v for k, v in (("q", q_), ("state", state), ("relay", relay)) if v}
        return "/devices?" + urlencode({**params, "page": n})

    context = {
        "rows": rows,
        "total": total,
        "search": q_,
        "state": state,
        "relay": relay,
        "states": q.STATE_LABELS,
        "page": page,
        "pages": pages,
        "prev_link": link(page - 1) if page > 1 else "",
        "next_link": link(page + 1) if page < pages else "",
    }
    return portal.render(request, "devices.html", context)


def _device_page(
    request: Request,
    portal: Portal,
    viewer: Viewer,
    device_id: str,
    *,
    error: str = "",
    done: str = "",
    status: int = 200,
) -> Response:
    with portal.sessions() as session:
        device = q.visible_device(session, viewer, device_id)
        if device is None:
            return portal.message(
                request, "Unknown device", "No such device in your account.", status_code=404
            )
        tunnel = q.open_tunnels(session, [device.id]).get(device.id)
        sessions = q.device_sessions(session, device.id)
        if not viewer.is_admin:
            sessions = [s for s in sessions if s.user_id == viewer.user_id]
        audit_rows = q.device_audit(session, device.id) if viewer.is_admin else []
    context = {
        "device": device,
        "state": q.state_of(device, tunnel),
        "states": q.STATE_LABELS,
        "tunnel": tunnel,
        "sessions": sessions,
        "audit_rows": audit_rows,
        "modes": device_ops.TUNNEL_MODES,
        "error": error,
        "done": DONE.get(done, ""),
    }
    return portal.render(request, "device.html", context, status_code=status)


@router.get("/devices/{device_id}")
def device_page(
    request: Request,
    device_id: str,
    portal: PortalDep,
    viewer: PageViewer,
    done: Annotated[str, Query(max_length=16)] = "",
) -> Response:
    return _device_page(request, portal, viewer, device_id, done=done)


@router.get("/devices/{device_id}/revoke")
def revoke_confirm(
    request: Request, device_id: str, portal: PortalDep, viewer: PageViewer
) -> Response:
    """The confirmation step: a page with one form; nothing changes on GET."""
    if not viewer.is_admin:
        return portal.message(
            request, "Forbidden", "Only account admins may do this.", status_code=403
        )
    with portal.sessions() as session:
        device = q.visible_device(session, viewer, device_id)
    if device is None:
        return portal.message(
            request, "Unknown device", "No such device in your account.", status_code=404
        )
    return portal.render(request, "device_revoke.html", {"device": device})


@router.post("/devices/{device_id}/{action}")
def device_action(
    request: Request,
    device_id: str,
    action: str,
    portal: PortalDep,
    viewer: AdminPostViewer,
    confirm: Annotated[str, Form(max_length=8)] = "",
    mode: Annotated[str, Form(max_length=16)] = "",
) -> Response:
    if action not in ACTIONS:
        return portal.message(request, "Not found", "No such device action.", status_code=404)
    if action == "revoke" and confirm != "yes":
        return RedirectResponse(f"/devices/{device_id}/revoke", status_code=303)
    ip, actor = client_ip(request), viewer.username
    try:
        with portal.sessions() as session, session.begin():
            device = q.visible_device(session, viewer, device_id)
            if device is None:
                text = "No such device in your account."
                return portal.message(request, "Unknown device", text, status_code=400)
            device_id = device.id
            if action == "accept":
                devices.accept_device(session, device_id=device.id, actor=actor, source_ip=ip)
            elif action == "revoke":
                devices.revoke_device(session, device_id=device.id, actor=actor, source_ip=ip)
            elif action == "repair":
                device_ops.request_repair(session, device=device, actor=actor, source_ip=ip)
            elif action == "close-tunnel":
                device_ops.request_close_tunnel(session, device=device, actor=actor, source_ip=ip)
            else:
                device_ops.set_tunnel_mode(
                    session, device=device, mode=mode, actor=actor, source_ip=ip
                )
    except InvalidInput as exc:
        return _device_page(request, portal, viewer, device_id, error=str(exc), status=400)
    portal.hub.notify(f"device:{device_id}")
    return RedirectResponse(f"/devices/{device_id}?done={action}", status_code=303)
