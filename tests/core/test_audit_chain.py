"""The audit hash chain: every row chained, `rly audit verify` names the first broken row."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from core import audit
from core.audit_verify import verify
from core.db import make_engine, make_sessions, upgrade
from core.models import AuditEvent
from tests.support.paths import private_dir
from tests.support.pg import fresh_database

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'rly.sqlite3'}"
    else:
        url = request.getfixturevalue("pg_url")
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:  # the PostgreSQL database is shared by the run: empty the log
        conn.execute(delete(AuditEvent))
    engine.dispose()
    return url


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    try:
        yield make_sessions(engine)
    finally:
        engine.dispose()


def _write(sessions: sessionmaker[Session], n: int) -> None:
    for i in range(n):
        with sessions() as s, s.begin():
            audit.record(s, action="test.row", actor="t", target=f"t{i}", detail=f"row {i}")


def _ids(sessions: sessionmaker[Session]) -> list[int]:
    with sessions() as s:
        return list(s.scalars(select(AuditEvent.id).order_by(AuditEvent.seq)))


def test_rows_are_chained_in_commit_order(sessions: sessionmaker[Session]) -> None:
    """Rows get positions 1..N, each linking to the previous row's hash; a rollback adds none."""
    _write(sessions, 3)
    with sessions() as s, s.begin():
        audit.record(s, action="a")
        audit.record(s, action="b")
    with sessions() as s:
        audit.record(s, action="rolled.back")
        s.rollback()
    with sessions() as s:
        rows = list(s.scalars(select(AuditEvent).order_by(AuditEvent.seq)))
        result = verify(s)
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5]
    assert [r.action for r in rows][-2:] == ["a", "b"]
    assert all(b.prev_hash == a.row_hash for a, b in itertools.pairwise(rows))
    assert result.line() == "audit chain intact: 5 rows"
    assert result.head == rows[-1].row_hash


def test_edited_row_is_named(sessions: sessionmaker[Session]) -> None:
    """Changing one column of one row makes verify name exactly that row as edited."""
    _write(sessions, 6)
    victim = _ids(sessions)[3]
    with sessions() as s, s.begin():
        s.execute(update(AuditEvent).where(AuditEvent.id == victim).values(detail="nothing here"))
    with sessions() as s:
        line = verify(s).line()
    edited = f"row {victim} was edited (its content does not match its hash)"
    assert line == f"audit chain broken: {edited}"


def test_edit_with_a_recomputed_hash_is_named(sessions: sessionmaker[Session]) -> None:
    """An edit whose row hash was recomputed still breaks the link from the next row."""
    _write(sessions, 5)
    ids = _ids(sessions)
    with sessions() as s, s.begin():
        row = s.get_one(AuditEvent, ids[1])
        row.actor = "someone else"
        row.row_hash = audit.row_digest(row)
    with sessions() as s:
        line = verify(s).line()
    assert line == (
        f"audit chain broken: row {ids[1]} was edited or replaced "
        f"(row {ids[2]} does not link to it)"
    )


def test_deleted_row_is_named(sessions: sessionmaker[Session]) -> None:
    """Deleting one row in the middle names its chain position and its neighbours."""
    _write(sessions, 6)
    ids = _ids(sessions)
    with sessions() as s, s.begin():
        s.execute(delete(AuditEvent).where(AuditEvent.id == ids[2]))
    with sessions() as s:
        line = verify(s).line()
    assert line == (
        "audit chain broken: the row at chain position 3 was removed "
        f"(between row {ids[1]} and row {ids[3]})"
    )


def test_reordered_rows_are_named(sessions: sessionmaker[Session]) -> None:
    """Swapping two rows' ids (their order in the table) is reported as out of order."""
    _write(sessions, 5)
    ids = _ids(sessions)
    with sessions() as s, s.begin():
        s.execute(update(AuditEvent).where(AuditEvent.id == ids[2]).values(id=-1))
        s.execute(update(AuditEvent).where(AuditEvent.id == ids[3]).values(id=ids[2]))
        s.execute(update(AuditEvent).where(AuditEvent.id == -1).values(id=ids[3]))
    with sessions() as s:
        line = verify(s).line()
    assert line == (
        f"audit chain broken: row {ids[2]} is out of order (chain position 4 after row {ids[3]})"
    )


WRITER = textwrap.dedent(
    """
    import sys
    from core import audit
    from core.db import make_engine, make_sessions
    url, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sessions = make_sessions(make_engine(url))
    for i in range(n):
        with sessions() as s, s.begin():
            audit.record(s, action="race.one", actor=name, target=str(i))
            if i % 3 == 0:
                audit.record(s, action="race.two", actor=name, target=str(i))
    """
)


def test_concurrent_writer_processes_keep_one_chain(
    db_url: str, sessions: sessionmaker[Session]
) -> None:
    """Six processes appending at once (relays, tracker, portal on one database) fork nothing."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, db_url, f"w{k}", "60"],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(6)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, "\n".join(errors)[-3000:]
    with sessions() as s:
        total = s.scalar(select(func.count()).select_from(AuditEvent))
        result = verify(s)
    assert total == 6 * (60 + 20)
    assert result.line() == f"audit chain intact: {total} rows"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migration_chains_rows_written_before_it(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Rows that existed before revision 0005 are chained by the upgrade, oldest first."""
    if backend == "sqlite":
        _migrate_with_old_rows(f"sqlite:///{tmp_path / 'old.sqlite3'}", "")
        return
    request.getfixturevalue("pg_url")  # skips (or fails) like the others without PostgreSQL
    with fresh_database() as url:
        _migrate_with_old_rows(url, "+00")


def _migrate_with_old_rows(url: str, zone: str) -> None:
    from alembic import command

    from core.db import alembic_config

    command.upgrade(alembic_config(url), "0004")
    engine = make_engine(url)
    with engine.begin() as conn:
        for i in range(4):
            conn.execute(
                text(
                    "INSERT INTO audit_events (at, action, actor, target, detail, source_ip) "
                    "VALUES (:at, 'old.row', 'seed', '', :d, '')"
                ),
                {"at": f"2026-11-0{i + 1} 10:00:00.000000{zone}", "d": f"old {i}"},
            )
    engine.dispose()
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessions(engine)
    _write(sessions, 2)
    with sessions() as s:
        seqs = list(s.scalars(select(AuditEvent.seq).order_by(AuditEvent.id)))
        line = verify(s).line()
    engine.dispose()
    assert seqs == [1, 2, 3, 4, 5, 6]
    assert line == "audit chain intact: 6 rows"


def _rly(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rly", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_rly_audit_verify_names_an_edited_then_a_deleted_row(tmp_path: Path) -> None:
    """`rly audit verify`: intact exit 0; an edited row named, exit 1; a deleted one named."""
    data_dir = private_dir(tmp_path, "data")
    for name in ("acme", "globex", "initech", "umbrella"):
        assert _rly(data_dir, "account", "add", name).returncode == 0
    ok = _rly(data_dir, "audit", "verify")
    assert (ok.returncode, ok.stdout) == (0, "audit chain intact: 4 rows\n")

    engine = make_engine(f"sqlite:///{data_dir / 'rly.sqlite3'}")
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET target = 'evil' WHERE seq = 2"))
    edited = _rly(data_dir, "audit", "verify")
    assert edited.returncode == 1
    assert edited.stdout.splitlines() == [
        "audit chain broken: row 2 was edited (its content does not match its hash)"
    ]
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq = 2"))
    engine.dispose()
    deleted = _rly(data_dir, "audit", "verify")
    assert deleted.returncode == 1
    assert deleted.stdout.splitlines() == [
        "audit chain broken: the row at chain position 2 was removed (between row 1 and row 3)"
    ]
