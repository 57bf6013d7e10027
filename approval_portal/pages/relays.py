"""Relays (admins): the fleet's nodes with state, heartbeat age and load; drain and resume.

The rows and the two actions are core.node_ops, the very functions behind
`rly relay list|drain|resume`, so the page and the CLI agree on state, rules
and audit rows. After the commit the hub wakes a relay in this process at
once; the others hear `node:<name>` through core.events (or at their next
look).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import RedirectResponse, Response

from approval_portal.auth import Viewer
from approval_portal.context import Portal, PortalDep
from approval_portal.deps import AdminPostViewer, AdminViewer
from approval_portal.security import client_ip
from core import node_ops
from core.config import parse_duration
from core.validate import InvalidInput

router = APIRouter()
ACTIONS = ("drain", "resume")
DONE = {
    "drain": "Drain started: the node takes no new tunnels, its devices move to other relays, "
    "and its sessions end by the deadline.",
    "resume": "The node takes tunnels again.",
}
# badge colours the stylesheet already has, by node state
BADGES = {"live": "online", "draining": "pending", "drained": "never", "gone": "revoked"}


def _page(
    request: Request,
    portal: Portal,
    *,
    error: str = "",
    done: str = "",
    status: int = 200,
) -> Response:
    with portal.sessions() as session:
        rows = node_ops.node_rows(session)
    context = {
        "rows": rows,
        "badges": BADGES,
        "default_deadline": node_ops.DEFAULT_DEADLINE,
        "error": error,
        "done": DONE.get(done, ""),
    }
    return portal.render(request, "relays.html", context, status_code=status)


@router.get("/relays")
def relays_page(
    request: Request,
    portal: PortalDep,
    viewer: AdminViewer,
    done: Annotated[str, Query(max_length=16)] = "",
) -> Response:
    return _page(request, portal, done=done)


def _deadline(text: str) -> float:
    try:
        return parse_duration(text.strip() or node_ops.DEFAULT_DEADLINE)
    except ValueError as exc:
        raise InvalidInput(f"deadline: {exc}") from None


def _act(
    request: Request, viewer: Viewer, portal: Portal, name: str, action: str, deadline: str
) -> str:
    ip, actor = client_ip(request), viewer.username
    with portal.sessions() as session, session.begin():
        if action == "drain":
            node = node_ops.drain_node(
                session, name=name, deadline=_deadline(deadline), actor=actor, source_ip=ip,
                account_id=viewer.account_id,
            )  # fmt: skip
        else:
            node = node_ops.resume_node(
                session, name=name, actor=actor, source_ip=ip, account_id=viewer.account_id
            )
        return node.name


@router.post("/relays/{name}/{action}")
def relay_action(
    request: Request,
    name: str,
    action: str,
    portal: PortalDep,
    viewer: AdminPostViewer,
    deadline: Annotated[str, Form(max_length=32)] = "",
) -> Response:
    if action not in ACTIONS:
        return portal.message(request, "Not found", "No such relay action.", status_code=404)
    try:
        node = _act(request, viewer, portal, name, action, deadline)
    except InvalidInput as exc:
        return _page(request, portal, error=str(exc), status=400)
    portal.hub.notify(f"node:{node}")  # after the commit: a relay in this process looks now
    return RedirectResponse(f"/relays?done={action}", status_code=303)
