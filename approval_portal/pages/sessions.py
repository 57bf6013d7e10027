"""Live and recent technician sessions; terminate one from the portal.

Technicians see (and may end) only their own sessions; admins their
account's; superadmins every account's. Terminating is the menu's
`close SESSION-ID` (core.session_close): the relay holding the session ends
it within a second and tells the technician who ended it.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from approval_portal.auth import Viewer
from approval_portal.context import PortalDep
from approval_portal.deps import PageViewer, PostViewer
from approval_portal.security import client_ip
from core import session_close
from core.models import Device, SshSession

router = APIRouter()
RECENT = 50


def visible(viewer: Viewer) -> list[ColumnElement[bool]]:
    """Which session rows this viewer may see and end."""
    if viewer.is_superadmin:
        return []
    if viewer.is_admin:
        return [SshSession.account_id == viewer.account_id]
    return [SshSession.account_id == viewer.account_id, SshSession.user_id == viewer.user_id]


def session_rows(session: Session, viewer: Viewer, *, live: bool, limit: int) -> list[Any]:
    """(SshSession, device hostname) pairs, newest first."""
    ended = SshSession.ended_at.is_(None) if live else SshSession.ended_at.is_not(None)
    return list(
        session.execute(
            select(SshSession, Device.hostname)
            .join(Device, Device.id == SshSession.device_id)
            .where(ended, *visible(viewer))
            .order_by(SshSession.started_at.desc())
            .limit(limit)
        ).all()
    )


@router.get("/sessions")
def sessions_page(
    request: Request,
    portal: PortalDep,
    viewer: PageViewer,
    done: Annotated[str, Query(max_length=16)] = "",
) -> Response:
    with portal.sessions() as session:
        live = session_rows(session, viewer, live=True, limit=500)
        recent = session_rows(session, viewer, live=False, limit=RECENT)
    context = {
        "live": live,
        "recent": recent,
        "recordings": portal.settings.relay.recordings,
        "done": "Asked the relay to end the session." if done == "terminate" else "",
    }
    return portal.render(request, "sessions.html", context)


@router.post("/sessions/{session_id}/terminate")
def terminate(request: Request, session_id: str, portal: PortalDep, viewer: PostViewer) -> Response:
    with portal.sessions() as session, session.begin():
        row = session_close.request_close(
            session,
            session_id=session_id,
            account_id=None if viewer.is_superadmin else viewer.account_id,
            only_user_id=None if viewer.is_admin else viewer.user_id,
            actor=viewer.username,
            source_ip=client_ip(request),
            via="portal",
        )
        closed = row.id if row is not None else None
    if closed is None:
        text = "There is no such live session of yours (it may have ended already)."
        return portal.message(request, "No such session", text, status_code=404)
    portal.hub.notify(f"session:{closed}")
    return RedirectResponse("/sessions?done=terminate", status_code=303)
