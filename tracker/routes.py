"""HTTP routes of the tracker: parse the request, call the Tracker, answer."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from tracker.auth import SignedRequest
from tracker.schemas import (
    CheckinReply,
    CheckinRequest,
    DeviceView,
    EnrollReply,
    EnrollRequest,
    ErrorReply,
)
from tracker.service import Tracker


async def get_tracker(request: Request) -> Tracker:
    tracker = request.app.state.tracker
    assert isinstance(tracker, Tracker)
    return tracker


TrackerDep = Annotated[Tracker, Depends(get_tracker)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorReply} for code in (400, 401, 403, 404, 409, 413)
}
_SIGNED = (
    "Signed with the device key: headers X-Rly-Device, X-Rly-Timestamp (ms), "
    "X-Rly-Signature (see core.signing)."
)

router = APIRouter(responses=_ERRORS)


def client_ip(request: Request) -> str:
    return request.client.host if request.client else ""


def request_path(request: Request) -> str:
    """The path as the client sent it (the signed one), mount prefix included."""
    root = str(request.scope.get("root_path", ""))
    path = str(request.scope["path"])
    return path if path.startswith(root) else root + path


async def signed_request(request: Request) -> SignedRequest:
    return SignedRequest(
        headers=request.headers,
        method=request.method,
        path=request_path(request),
        body=await request.body(),
    )


@router.post("/enroll")
async def enroll(body: EnrollRequest, request: Request, tracker: TrackerDep) -> EnrollReply:
    """Enroll a device with a token; the token is the credential."""
    return await tracker.enroll(body=body, source_ip=client_ip(request))


@router.post("/checkin", description=_SIGNED)
async def checkin(report: CheckinRequest, request: Request, tracker: TrackerDep) -> CheckinReply:
    """Report the device state; long-polls up to `wait` seconds for an action."""
    signed = await signed_request(request)
    return await tracker.checkin(report=report, request=signed, ip=client_ip(request))


@router.get("/devices/{device_id}", description=_SIGNED)
async def device(device_id: str, request: Request, tracker: TrackerDep) -> DeviceView:
    """The tracker's view of the calling device."""
    signed = await signed_request(request)
    return await tracker.device_view(device_id=device_id, request=signed)
