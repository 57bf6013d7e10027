"""`POST /checkin` without FastAPI's per-request machinery: the tracker's hot path.

The FastAPI route in tracker.routes stays the documented one (OpenAPI) and
the reference for behaviour; this ASGI shim answers the same requests first,
the same way: the body is parsed as FastAPI parses it (JSON only for a JSON
content type), validated by the same strict pydantic model, and every refusal
is the same one-line error with the same status. What it skips is dependency
solving, response-model validation and one middleware stack per request.
Anything but `POST /checkin` passes through to the FastAPI app.
"""

from __future__ import annotations

import email.message
import json
import logging
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette._utils import get_route_path
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from tracker.auth import SignedRequest
from tracker.errors import ApiError, database_unavailable, error_response, validation_message
from tracker.schemas import CheckinRequest
from tracker.service import Tracker

log = logging.getLogger("tracker.errors")
PATH = "/checkin"
_MISSING = object()


class BadBody(ApiError):
    """A body FastAPI would refuse before the endpoint runs (400, not logged)."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


class CheckinRoute:
    def __init__(self, app: ASGIApp, tracker: Tracker) -> None:
        self.app = app
        self.tracker = tracker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or get_route_path(scope) != PATH:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        headers = Headers(scope=scope)
        client = scope.get("client")
        ip = client[0] if client else ""
        try:
            report = parse_report(body, headers.get("content-type"))
            signed = SignedRequest(
                headers=headers, method="POST", path=_signed_path(scope), body=body
            )
            reply = await self.tracker.checkin(report=report, request=signed, ip=ip)
            response = JSONResponse(reply.model_dump())
        except BadBody as exc:
            response = error_response(exc.status_code, exc.message)
        except ApiError as exc:
            log.info(
                "refused POST %s from %s: %d %s",
                scope["path"], ip or "-", exc.status_code, exc.message,
            )  # fmt: skip
            response = error_response(exc.status_code, exc.message)
        except SQLAlchemyError as exc:
            response = database_unavailable(exc)
        await response(scope, receive, send)


def parse_report(body: bytes, content_type: str | None) -> CheckinRequest:
    """The body as FastAPI would bind it to a `CheckinRequest` parameter; BadBody if not."""
    value: Any = _MISSING
    if body:
        value = body
        if content_type and _is_json(content_type):
            try:
                value = json.loads(body)
            except json.JSONDecodeError:
                raise BadBody(validation_message([{"type": "json_invalid"}])) from None
            except UnicodeDecodeError:
                raise BadBody("There was an error parsing the body") from None
    if value is _MISSING:
        raise BadBody(validation_message([{"type": "missing", "loc": ("body",)}]))
    try:
        return CheckinRequest.model_validate(value, from_attributes=True)  # as FastAPI binds it
    except ValidationError as exc:
        errors = [dict(e, loc=("body", *e["loc"])) for e in exc.errors(include_url=False)]
        raise BadBody(validation_message(errors)) from None


def _is_json(content_type: str) -> bool:
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


def _signed_path(scope: Scope) -> str:
    """The path as the client sent it (the signed one), mount prefix included."""
    root = str(scope.get("root_path", ""))
    path = str(scope["path"])
    return path if path.startswith(root) else root + path


async def _read_body(receive: Receive) -> bytes:
    """The whole body (BodyLimit in front has already capped it)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
