"""The tracker: device enrollment, signed check-ins and status (mounted at /api/v1)."""

from __future__ import annotations

from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.hub import Hub
from core.keys import KeyStore
from tracker.auth import Verifier
from tracker.checkin_route import CheckinRoute
from tracker.errors import install_error_handlers
from tracker.limits import MAX_BODY, BodyLimit
from tracker.routes import router
from tracker.service import Tracker


def create_app(
    settings: Settings, sessions: sessionmaker[Session], hub: Hub, keys: KeyStore
) -> FastAPI:
    """The tracker API; its OpenAPI document is served at <mount>/openapi.json."""
    app = FastAPI(title="rly tracker", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.tracker = Tracker(
        settings=settings,
        sessions=sessions,
        hub=hub,
        keys=keys,
        verifier=Verifier(skew_seconds=settings.tracker.clock_skew),
    )
    install_error_handlers(app)
    app.add_middleware(CheckinRoute, tracker=app.state.tracker)  # the hot path, answered first
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY)
    app.include_router(router)
    return app
