"""Faults: an unavailable or locked database gives a clear 503 page, never a traceback."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from approval_portal.app import DB_DOWN, create_app
from core.config import Settings
from core.hub import Hub
from rly.serve import build_http_app, prepare
from tests.portal.support import PortalEnv, TestClient


def test_database_down_shows_503_page(tmp_path: Path) -> None:
    """With no reachable database, login and approval pages answer 503 with one sentence."""
    engine = create_engine(f"sqlite:///{tmp_path / 'missing' / 'rly.sqlite3'}")
    app = create_app(Settings(), sessionmaker(engine), Hub())
    with TestClient(app, follow_redirects=False) as client:
        form = client.get("/login")
        csrf = form.cookies.get("rly_login")
        data = {"username": "a", "password": "b", "code": "", "csrf": csrf or ""}
        response = client.post("/login", data=data)
        assert response.status_code == 503
        assert DB_DOWN in response.text
        assert "Traceback" not in response.text
        client.cookies.set("rly_session", "x" * 43)
        assert client.get("/approve/abc").status_code == 503
    engine.dispose()


def test_locked_database_shows_503_page(env: PortalEnv, tmp_path: Path) -> None:
    """A database locked by another writer gives the 503 page, not a hang or a traceback."""
    path = env.settings.data_dir / "rly.sqlite3"
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.2})
    app = create_app(env.settings, sessionmaker(engine), Hub())
    locker = sqlite3.connect(path, timeout=0.2)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        with TestClient(app, follow_redirects=False) as client:
            csrf = client.get("/login").cookies.get("rly_login") or ""
            data = {"username": "nobody", "password": "pw-pw-pw", "code": "", "csrf": csrf}
            response = client.post("/login", data=data)
        assert response.status_code == 503
        assert DB_DOWN in response.text
    finally:
        locker.rollback()
        locker.close()
        engine.dispose()


def test_portal_is_mounted_beside_healthz(tmp_path: Path) -> None:
    """In the composed `rly serve` app the portal answers at / next to /healthz."""
    prepared = prepare(Settings(data_dir=tmp_path))
    try:
        with TestClient(build_http_app(prepared, Hub(), {"portal"}), follow_redirects=False) as c:
            assert c.get("/healthz").json() == {"status": "ok"}
            assert c.get("/").headers["location"] == "/login"
            assert "Log in" in c.get("/login").text
            assert c.get("/static/style.css").status_code == 200
            assert c.get("/no-such-page").status_code == 404
    finally:
        prepared.engine.dispose()
