"""What an audit row costs the writer: chained append (core.audit) vs a plain insert.

    python -m bench.audit_write [--rows 2000] [--pg postgresql+psycopg://postgres@127.0.0.1/test]

Each row is its own transaction, as on the relay's and tracker's hot paths
(`with sessions() as s, s.begin(): audit.record(s, ...)`). "plain" inserts the
same row with a position from a Python counter and no lock, no head read and no
hashing: what `audit.record` cost before the chain. Prints microseconds per row,
wall clock and this process's CPU (the latter moves less on a busy machine).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from core import audit
from core.db import make_engine, make_sessions, upgrade
from core.models import AuditEvent, utcnow


def _chained(sessions: sessionmaker[Session], i: int) -> None:
    with sessions() as s, s.begin():
        audit.record(s, action="tunnel.up", actor="relay", target=f"dev{i}", detail="bench")


def _plain(sessions: sessionmaker[Session], i: int) -> None:
    with sessions() as s, s.begin():
        s.add(
            AuditEvent(
                at=utcnow(),
                action="tunnel.up",
                actor="relay",
                target=f"dev{i}",
                detail="bench",
                seq=10_000_000 + i,
                prev_hash="0" * 64,
                row_hash="0" * 64,
            )
        )


def _per_row(
    fn: Callable[[sessionmaker[Session], int], None], url: str, rows: int
) -> tuple[float, float]:
    """(wall, this process's CPU) microseconds per row."""
    engine = make_engine(url)
    sessions = make_sessions(engine)
    with sessions() as s, s.begin():
        s.execute(delete(AuditEvent))
    for i in range(50):  # warm the pool and the caches
        fn(sessions, i)
    with sessions() as s, s.begin():
        s.execute(delete(AuditEvent))
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(rows):
        fn(sessions, i)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    engine.dispose()
    return elapsed / rows * 1e6, cpu / rows * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--pg", default="", help="a PostgreSQL URL to measure too (emptied!)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        urls = [("sqlite", f"sqlite:///{Path(tmp) / 'bench.sqlite3'}")]
        if args.pg:
            urls.append(("postgresql", args.pg))
        for name, url in urls:
            upgrade(url)
            for label, fn in (("plain", _plain), ("chained", _chained)) * 2:
                wall, cpu = _per_row(fn, url, args.rows)
                print(f"{name:<10} {label:<8} {wall:8.1f} us/row wall {cpu:8.1f} us/row CPU")


if __name__ == "__main__":
    main()
