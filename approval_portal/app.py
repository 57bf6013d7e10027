"""Placeholder portal app (filled in by the technician issue)."""

from __future__ import annotations

from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.hub import Hub


def create_app(settings: Settings, sessions: sessionmaker[Session], hub: Hub) -> FastAPI:
    return FastAPI(title="rly portal")
