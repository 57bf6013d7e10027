"""Remembered approvals (relay.approval_cache) in the portal: list them, revoke one.

Admins see their account's grants, technicians their own; revoking (POST with
the CSRF token) stops the next login from using the grant and ends nothing that
is running (core.approval_cache). The page also says whether the account asks
for a second person's approval (`rly account set NAME --second-approver on`).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select

from approval_portal.auth import Viewer
from approval_portal.context import Portal, PortalDep
from approval_portal.deps import Forbidden, PageViewer, PostViewer
from approval_portal.security import client_ip
from core import approval_cache
from core.models import User, utcnow
from core.validate import InvalidInput

router = APIRouter()


def _page(
    request: Request, portal: Portal, viewer: Viewer, error: str = "", status: int = 200
) -> Response:
    with portal.sessions() as session:
        user = session.get(User, viewer.user_id)
        if user is None:
            raise Forbidden("Your portal user no longer exists.")
        grants = approval_cache.visible(session, user=user)
        ids = {g.user_id for g in grants}
        rows = session.execute(select(User.id, User.username).where(User.id.in_(ids)))
        names = {uid: name for uid, name in rows}
        second = user.account.second_approver
    return portal.render(
        request,
        "approvals_cache.html",
        {
            "grants": grants,
            "names": names,
            "second_approver": second,
            "cache_ttl": portal.settings.relay.approval_cache,
            "now": utcnow(),
            "error": error,
        },
        status_code=status,
    )


@router.get("/approvals/remembered")
def remembered_page(request: Request, portal: PortalDep, viewer: PageViewer) -> Response:
    return _page(request, portal, viewer)


@router.post("/approvals/remembered/{grant_id}/revoke")
def revoke(request: Request, grant_id: int, portal: PortalDep, viewer: PostViewer) -> Response:
    try:
        with portal.sessions() as session, session.begin():
            user = session.get(User, viewer.user_id)
            if user is None:
                raise Forbidden("Your portal user no longer exists.")
            approval_cache.revoke(
                session, grant_id=grant_id, user=user, source_ip=client_ip(request)
            )
    except InvalidInput as exc:
        return _page(request, portal, viewer, str(exc), 400)
    return RedirectResponse("/approvals/remembered", status_code=303)
