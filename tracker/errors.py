"""One-line JSON errors: every 4xx the tracker sends is `{"error": "<one line>"}`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.validate import strip_controls

log = logging.getLogger(__name__)
MAX_MESSAGE = 200


class ApiError(Exception):
    """A refused request: the HTTP status and the one-line reason the client sees."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def one_line(text: str) -> str:
    """Printable, single-line and bounded: safe to echo back to a client."""
    flat = strip_controls(" ".join(text.split()))
    return flat[:MAX_MESSAGE] or "bad request"


def error_response(status_code: int, message: str) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status_code)


def validation_message(errors: list[dict[str, Any]]) -> str:
    """Describe the first validation error in one line, naming the field."""
    if not errors:
        return "invalid request"
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "request body is not valid JSON"
    loc = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    if kind == "value_error" and "error" in first.get("ctx", {}):
        return str(first["ctx"]["error"])
    if kind == "missing":
        return f"{loc or 'request body'} is required"
    return f"{loc or 'request body'}: {first.get('msg', 'invalid')}"


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    client = request.client.host if request.client else "-"
    log.info(
        "refused %s %s from %s: %d %s",
        request.method,
        request.url.path,
        client,
        exc.status_code,
        exc.message,
    )
    return error_response(exc.status_code, exc.message)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(400, validation_message(list(exc.errors())))


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    response = error_response(exc.status_code, str(exc.detail))
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _database_error(_request: Request, exc: Exception) -> JSONResponse:
    return database_unavailable(exc)


def database_unavailable(exc: Exception) -> JSONResponse:
    """Fail closed with a clear 503 (never a 500 or a traceback) while the database is away."""
    log.warning("tracker: database unavailable: %s", type(exc).__name__)
    return error_response(503, "database unavailable; try again shortly")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(SQLAlchemyError, _database_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
