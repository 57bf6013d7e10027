"""The root HTTP app: /healthz (does the database answer?) and /metrics."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import Select, func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core import metrics
from core.models import Approval, Device, SshSession, Tunnel


def _gauges(session: Session) -> dict[str, float]:
    def count(query: Select[int]) -> float:
        return float(session.scalar(query) or 0)

    return {
        "rly_tunnels_open": count(
            select(func.count()).select_from(Tunnel).where(Tunnel.closed_at.is_(None))
        ),
        "rly_sessions_live": count(
            select(func.count()).select_from(SshSession).where(SshSession.ended_at.is_(None))
        ),
        "rly_approvals_pending": count(
            select(func.count()).select_from(Approval).where(Approval.status == "pending")
        ),
        "rly_devices_pending": count(
            select(func.count()).select_from(Device).where(Device.status == "pending")
        ),
    }


def create_root_app(sessions: sessionmaker[Session]) -> FastAPI:
    app = FastAPI(title="rly", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        try:
            with sessions() as session:
                session.execute(text("SELECT 1"))
        except SQLAlchemyError:
            return JSONResponse({"status": "database unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    def metrics_endpoint() -> PlainTextResponse:
        try:
            with sessions() as session:
                gauges = _gauges(session)
        except SQLAlchemyError:
            gauges = {"rly_database_up": 0.0}
        else:
            gauges["rly_database_up"] = 1.0
        return PlainTextResponse(metrics.render(gauges), media_type="text/plain; version=0.0.4")

    return app
