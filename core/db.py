"""Engines, sessions and migrations for SQLite (embedded) and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


class DatabaseError(RuntimeError):
    """The database cannot be reached or migrated; the message is one line."""


def make_engine(url: str) -> Engine:
    """An engine tuned for the backend: WAL and a busy timeout on SQLite."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 5},
            pool_size=8,
            max_overflow=8,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url, pool_pre_ping=True, pool_size=8, max_overflow=8, connect_args={"connect_timeout": 5}
    )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def make_sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def check_connection(engine: Engine) -> None:
    """Fail fast with one line when the database is unreachable."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"database {engine.url.render_as_string()} is unreachable: {_first_line(exc)}"
        ) from None


def _first_line(exc: BaseException) -> str:
    text_ = str(getattr(exc, "orig", None) or exc).strip()
    return text_.splitlines()[0] if text_ else type(exc).__name__


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _head() -> str | None:
    from alembic.script import ScriptDirectory

    head: str | None = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    return head


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at; None when it has no schema yet."""
    from alembic.migration import MigrationContext

    try:
        with engine.connect() as conn:
            current: str | None = MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read the schema version: {_first_line(exc)}") from None
    return current


def applied_between(before: str | None, after: str | None) -> list[str]:
    """The revisions an upgrade from `before` to `after` applied, oldest first."""
    from alembic.script import ScriptDirectory

    if after is None or before == after:
        return []
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    revisions = script.iterate_revisions(after, before or "base")
    return [rev.revision for rev in reversed(list(revisions))]


def check_migrated(engine: Engine) -> None:
    """Refuse to serve a database whose schema is behind this version's migrations."""
    head, current = _head(), current_revision(engine)
    if current != head:
        where = f"is at schema {current}" if current else "has no schema yet"
        raise DatabaseError(f"database {where}, this rly needs {head}: run 'rly db upgrade' first")


def upgrade(url: str) -> tuple[str | None, str | None]:
    """Apply every migration (idempotent); the revisions before and after."""
    from alembic import command

    engine = make_engine(url)
    try:
        before = current_revision(engine)
        command.upgrade(alembic_config(url), "head")
        after = current_revision(engine)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"database migration failed: {_first_line(exc)}") from None
    finally:
        engine.dispose()
    return before, after
