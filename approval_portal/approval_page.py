"""`/approve/{token}`: show an SSH login request, then approve or reject it once.

The page changes nothing on GET. Unknown tokens are 404 and used, expired or
abandoned ones 410, without creating any row. The decision itself is
`core.approvals.decide` (one conditional UPDATE, so a token is decided once);
then the hub wakes the relay in this process at once.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session

from approval_portal.auth import Viewer
from approval_portal.context import Portal, PortalDep
from approval_portal.deps import Forbidden, PageViewer, PostViewer
from approval_portal.security import client_ip
from core import approvals, metrics
from core.models import Approval, User, utcnow

router = APIRouter()
GONE = {
    "approved": "This request was already approved.",
    "rejected": "This request was already rejected.",
    "expired": "This request has expired; the SSH session was told so.",
    "abandoned": "The SSH client disconnected: this request is gone.",
}


def _refusal(session: Session, approval: Approval | None, viewer: Viewer) -> tuple[int, str] | None:
    """Why this approval cannot be decided by this viewer now (status code, sentence)."""
    if approval is None:
        return 404, "This approval link is not valid. Check the URL shown by the SSH session."
    if approval.status != "pending":
        return 410, GONE.get(approval.status, f"This request is {approval.status}.")
    if approval.expires_at <= utcnow():
        return 410, GONE["expired"]
    user = session.get(User, viewer.user_id)
    if user is None:
        return 403, "Your portal user no longer exists."
    refusal = approvals.approver_refusal(session, approval, user)  # the owner, or a second person
    return (403, refusal) if refusal is not None else None


def _refuse(request: Request, portal: Portal, status: int, text: str) -> Response:
    title = {404: "Unknown approval link", 403: "Not yours to approve"}.get(
        status, "Request no longer open"
    )
    return portal.message(request, title, text, status_code=status)


@router.get("/approve/{token}")
def show(request: Request, token: str, portal: PortalDep, viewer: PageViewer) -> Response:
    with portal.sessions() as session:
        approval = approvals.find_by_token(session, token)
        refusal = _refusal(session, approval, viewer)
        acts_as = approvals.acting_user(session, approval) if approval is not None else None
    if refusal is not None:
        return _refuse(request, portal, *refusal)
    name = acts_as.username if acts_as is not None else viewer.username
    return portal.render(
        request, "approve.html", {"approval": approval, "token": token, "acts_as": name}
    )


@router.post("/approve/{token}")
def decide(
    request: Request,
    token: str,
    portal: PortalDep,
    viewer: PostViewer,
    decision: Annotated[str, Form(max_length=16)] = "",
) -> Response:
    if decision not in ("approve", "reject"):
        return portal.message(request, "Bad request", "Choose Approve or Reject.", status_code=400)
    with portal.sessions() as session, session.begin():
        approval = approvals.find_by_token(session, token)
        refusal = _refusal(session, approval, viewer)
        if refusal is not None:
            return _refuse(request, portal, *refusal)
        user = session.get(User, viewer.user_id)
        if user is None:
            raise Forbidden("Your portal user no longer exists.")
        try:
            approval = approvals.decide(
                session,
                token=token,
                user=user,
                approve=decision == "approve",
                source_ip=client_ip(request),
            )
        except approvals.ApprovalError as exc:  # lost a race: nothing was written
            return _refuse(request, portal, 409, str(exc))
    portal.hub.notify(f"approval:{approval.id}")
    metrics.inc("rly_approvals_total", outcome=approval.status)  # committed above
    return portal.render(request, "approve_done.html", {"approval": approval})
