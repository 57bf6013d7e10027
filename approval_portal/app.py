"""The approval portal: server-rendered pages that work without JavaScript.

`create_app` wires the routers, the security headers and the error pages. A
database that is down or locked gives a one-sentence 503 page, never a
traceback; any unknown path or bad form gives a plain page too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException

from approval_portal import (
    admin,
    approval_page,
    approvals_cache,
    audit_pages,
    pages,
    recordings,
    routes,
    totp_enrol,
)
from approval_portal.context import HERE, Portal, make_portal
from approval_portal.deps import Forbidden, LoginRequired
from approval_portal.security import SecurityHeaders
from core.config import Settings
from core.hub import Hub

log = logging.getLogger(__name__)
DB_DOWN = "The database is unavailable; try again shortly."


def create_app(
    settings: Settings,
    sessions: sessionmaker[Session],
    hub: Hub,
    *,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The portal app (mounted at "/"); `clock` is for TOTP and rate-limit tests."""
    app = FastAPI(title="rly portal", docs_url=None, redoc_url=None, openapi_url=None)
    portal = make_portal(settings, sessions, hub, clock)
    app.state.portal = portal
    for router in (routes.router, approval_page.router, totp_enrol.router, admin.router):
        app.include_router(router)
    app.include_router(audit_pages.router)
    app.include_router(recordings.router)
    app.include_router(approvals_cache.router)
    for router in pages.routers():  # dashboard, devices, sessions, tokens, users, relays
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    _add_error_pages(app, portal)
    app.add_middleware(SecurityHeaders, https=portal.secure)
    return app


def _add_error_pages(app: FastAPI, portal: Portal) -> None:
    async def database_down(request: Request, exc: Exception) -> Response:
        log.warning("portal: database unavailable: %s", type(exc).__name__)
        request.state.viewer = None
        return portal.message(request, "Database unavailable", DB_DOWN, status_code=503)

    async def login_required(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LoginRequired)
        return RedirectResponse(f"/login?{urlencode({'next': exc.next_path})}", status_code=303)

    async def forbidden(request: Request, exc: Exception) -> Response:
        return portal.message(request, "Forbidden", str(exc), status_code=403)

    async def bad_form(request: Request, exc: Exception) -> Response:
        return portal.message(request, "Bad request", "The form was not valid.", status_code=400)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        text = "There is no such page." if exc.status_code == 404 else str(exc.detail)
        return portal.message(
            request, f"Error {exc.status_code}", text, status_code=exc.status_code
        )

    app.add_exception_handler(SQLAlchemyError, database_down)
    app.add_exception_handler(LoginRequired, login_required)
    app.add_exception_handler(Forbidden, forbidden)
    app.add_exception_handler(RequestValidationError, bad_form)
    app.add_exception_handler(HTTPException, http_error)
