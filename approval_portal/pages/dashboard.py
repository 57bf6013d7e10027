"""The dashboard: what needs a decision first, then what is wrong, then what is live.

Order: SSH logins waiting for this user's approval and devices waiting for
acceptance (each with its buttons), devices that stopped checking in, live
sessions, and a chart of tunnels online over 24 hours.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from approval_portal.auth import Viewer
from approval_portal.context import PortalDep
from approval_portal.deps import Forbidden, OptionalViewer, PostViewer
from approval_portal.pages import device_queries as q
from approval_portal.pages import tunnel_chart
from approval_portal.pages.sessions import session_rows
from approval_portal.security import client_ip
from core import approvals, metrics
from core.models import Account, Approval, Device, User, utcnow

router = APIRouter()


def pending_approvals(session: Session, viewer: Viewer) -> list[Approval]:
    """Key logins of this account that this viewer may decide (the owner's own, or a second
    person's); a gate login is reached only through its URL, so it is never listed."""
    user = session.get(User, viewer.user_id)
    if user is None:
        return []
    rows = session.scalars(
        select(Approval)
        .join(User, User.id == Approval.required_user_id)
        .where(
            Approval.status == "pending",
            Approval.expires_at > utcnow(),
            User.account_id == viewer.account_id,
        )
        .order_by(Approval.created_at)
        .limit(50)
    )
    return [a for a in rows if approvals.approver_refusal(session, a, user) is None][:20]


def pending_devices(session: Session, viewer: Viewer) -> list[tuple[Device, str]]:
    return list(
        session.execute(
            select(Device, Account.name)
            .join(Account, Account.id == Device.account_id)
            .where(Device.status == "pending", *q.scope(viewer, Device.account_id))
            .order_by(Device.created_at)
            .limit(20)
        ).all()
    )


@router.get("/")
def dashboard(request: Request, portal: PortalDep, viewer: OptionalViewer) -> Response:
    if viewer is None:
        return RedirectResponse("/login", status_code=303)
    tracker = portal.settings.tracker
    stale_after = max(3 * (tracker.checkin_wait + tracker.checkin_interval), 120.0)
    scope = q.scope(viewer, Device.account_id)
    with portal.sessions() as session:
        context = {
            "approvals": pending_approvals(session, viewer),
            "pending": pending_devices(session, viewer) if viewer.is_admin else [],
            "stale": q.not_checking_in(session, viewer, stale_after),
            "live": session_rows(session, viewer, live=True, limit=10),
            "chart": tunnel_chart.render(tunnel_chart.online_counts(session, scope)),
            "total": session.scalar(select(func.count()).select_from(Device).where(*scope)) or 0,
            "states": q.STATE_LABELS,
        }
    return portal.render(request, "dashboard.html", context)


@router.post("/approvals/{approval_id}/decide")
def decide(
    request: Request,
    approval_id: int,
    portal: PortalDep,
    viewer: PostViewer,
    decision: Annotated[str, Form(max_length=16)] = "",
) -> Response:
    """Approve or reject a key login from the dashboard: the same rules as the link's page."""
    if decision not in ("approve", "reject"):
        return portal.message(request, "Bad request", "Choose Approve or Reject.", status_code=400)
    with portal.sessions() as session, session.begin():
        approval = session.get(Approval, approval_id)
        user = session.get(User, viewer.user_id)
        if user is None:
            raise Forbidden("Your portal user no longer exists.")
        if approval is None or approval.required_user_id is None:  # gate logins: by URL only
            text = "There is no such request waiting for you."
            return portal.message(request, "Unknown request", text, status_code=404)
        try:
            approvals.decide_approval(
                session,
                approval=approval,
                user=user,
                approve=decision == "approve",
                source_ip=client_ip(request),
            )
        except approvals.ApprovalError as exc:
            return portal.message(request, "Request no longer open", str(exc), status_code=409)
    portal.hub.notify(f"approval:{approval_id}")
    metrics.inc("rly_approvals_total", outcome="approved" if decision == "approve" else "rejected")
    return RedirectResponse("/", status_code=303)
