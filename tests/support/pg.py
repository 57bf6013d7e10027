"""Throw-away PostgreSQL databases on the test server."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

ADMIN_URL = os.environ.get("RLY_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")


def admin_connection(admin_url: str = ADMIN_URL) -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit connection to the maintenance database (raises psycopg.OperationalError)."""
    return psycopg.connect(admin_url, autocommit=True, connect_timeout=5)


def database_exists(name: str, admin_url: str = ADMIN_URL) -> bool:
    """Whether a database called `name` exists on the server."""
    with admin_connection(admin_url) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        return row is not None


@contextmanager
def fresh_database(admin_url: str = ADMIN_URL) -> Iterator[str]:
    """Create a uniquely named database; yield its SQLAlchemy URL; drop it (forcibly) on exit."""
    name = f"rly_test_{os.getpid()}_{secrets.token_hex(4)}"
    with admin_connection(admin_url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        server = admin_url.split("://", 1)[1].rsplit("/", 1)[0]
        yield f"postgresql+psycopg://{server}/{name}"
    finally:
        with admin_connection(admin_url) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
