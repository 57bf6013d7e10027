"""Placeholder tracker app (filled in by the device issue)."""

from __future__ import annotations

from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.hub import Hub
from core.keys import KeyStore


def create_app(
    settings: Settings, sessions: sessionmaker[Session], hub: Hub, keys: KeyStore
) -> FastAPI:
    return FastAPI(title="rly tracker")
