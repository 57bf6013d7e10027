"""Portal fixtures: a migrated template database copied per test, and the app on it."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.config import PortalSettings, Settings
from core.db import upgrade
from tests.portal.support import PortalEnv, make_portal_env

MakeEnv = Callable[..., PortalEnv]


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite file with every migration applied; each test gets a copy."""
    path = tmp_path_factory.mktemp("portal-template") / "rly.sqlite3"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def make_env(tmp_path: Path, migrated_db: Path) -> Iterator[MakeEnv]:
    """Build a portal on a fresh database; keyword args override portal settings."""
    built: list[PortalEnv] = []

    def make(public_url: str = "http://localhost:8000", **portal: Any) -> PortalEnv:
        settings = Settings()
        settings = dataclasses.replace(
            settings,
            portal=dataclasses.replace(PortalSettings(), **portal),
            http=dataclasses.replace(settings.http, public_url=public_url),
        )
        data_dir = tmp_path / f"data{len(built)}"
        data_dir.mkdir()
        env = make_portal_env(data_dir, migrated_db, settings, now=time.time())
        built.append(env)
        return env

    try:
        yield make
    finally:
        for env in built:
            env.close()
            env.sessions.kw["bind"].dispose()


@pytest.fixture
def env(make_env: MakeEnv) -> PortalEnv:
    """A portal with default settings on a fresh database."""
    return make_env()
