"""Audit rows: one per decision, never containing a secret, chained by hashes.

Every row carries `seq` (its position in the chain, 1, 2, 3, ...), the hash of
the row before it and its own hash: SHA-256 over a canonical encoding of its
content and that previous hash (`row_digest`). `core.audit_chain.verify` walks
the chain and names the first row that was edited, removed or reordered.

Why rows are chained at commit: `record` only queues the row on the caller's
session; a `before_commit` hook appends the queued rows as the transaction's
last step. Appends must be serialised across processes (relays, tracker and
portal may share one PostgreSQL) or two writers would read the same chain head
and fork the chain. On PostgreSQL the hook takes a transaction-level advisory
lock (`pg_advisory_xact_lock`, released by the commit) before reading the head,
both in one round trip (the function `rly_audit_locked_head`, migration 0005);
on SQLite it makes sure the transaction holds the database write lock first
(a no-op UPDATE), which serialises writers the same way. Taking the lock last
keeps it held only for one SELECT, the INSERTs and the COMMIT, and it cannot
deadlock with the row locks the transaction took earlier. A unique index on
`seq` turns any fork that slipped through into a failed commit, not a silent
branch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.orm import Session, SessionTransaction

from core.models import AuditEvent, utcnow

log = logging.getLogger(__name__)
GENESIS = "0" * 64  # the "previous hash" of the first row
CHAIN_VERSION = "rly-audit-v1"
PG_LOCK_KEY = 0x726C79_61756474  # "rly" "audt": one advisory lock for all audit appends
_PENDING = "rly_audit_pending"


@dataclass(frozen=True)
class ChainHead:
    seq: int
    row_hash: str


def record(
    session: Session,
    *,
    action: str,
    actor: str = "",
    account_id: int | None = None,
    target: str = "",
    detail: str = "",
    source_ip: str = "",
) -> AuditEvent:
    """Queue an audit row on the caller's transaction; it is chained and written at commit."""
    event = AuditEvent(
        at=utcnow(),
        action=action,
        actor=actor[:128],
        account_id=account_id,
        target=target[:256],
        detail=detail,
        source_ip=source_ip[:64],
    )
    session.info.setdefault(_PENDING, []).append(event)
    log.info("audit action=%s actor=%s target=%s", action, actor, target)
    return event


def canonical(row: AuditEvent) -> bytes:
    """The bytes a row's hash covers: its content, its position and the previous hash."""
    at = row.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    fields = [
        CHAIN_VERSION,
        row.seq,
        at,
        row.action,
        row.actor,
        row.account_id,
        row.target,
        row.detail,
        row.source_ip,
        row.prev_hash,
    ]
    return json.dumps(fields, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def row_digest(row: AuditEvent) -> str:
    return hashlib.sha256(canonical(row)).hexdigest()


_HEAD = text("SELECT seq, row_hash FROM audit_events ORDER BY seq DESC LIMIT 1")


def chain_head(session: Session) -> ChainHead | None:
    """The last row of the chain (read it under the append lock to append after it).

    Plain SQL on the connection: the ORM's select path costs several times as much CPU,
    and this runs once per audited transaction on the relay's and tracker's hot paths.
    """
    row = session.connection().execute(_HEAD).first()
    return None if row is None else ChainHead(row[0], row[1])


def lock_chain(session: Session) -> None:
    """Hold the append lock until this transaction ends (see the module docstring)."""
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
    elif conn.dialect.name == "sqlite":
        dbapi: Any = conn.connection.dbapi_connection
        if not dbapi.in_transaction:  # no write yet: take the write lock before reading
            conn.execute(text("UPDATE audit_events SET seq = seq WHERE 0"))


# One round trip on PostgreSQL: the function takes the lock, then reads the head with a
# fresh snapshot (each statement of a VOLATILE plpgsql function gets one); created by 0005.
_PG_LOCKED_HEAD = text("SELECT seq, row_hash FROM rly_audit_locked_head(:key)")


def locked_head(session: Session) -> ChainHead | None:
    """Take the append lock, then read the chain head (what a new row must follow)."""
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        row = conn.execute(_PG_LOCKED_HEAD, {"key": PG_LOCK_KEY}).first()
        return None if row is None or row[0] is None else ChainHead(row[0], row[1])
    lock_chain(session)
    return chain_head(session)


def chain(rows: list[AuditEvent], head: ChainHead | None) -> None:
    """Give `rows` their positions and hashes after `head` (in place)."""
    seq, prev = (head.seq, head.row_hash) if head is not None else (0, GENESIS)
    for row in rows:
        seq += 1
        row.seq, row.prev_hash = seq, prev
        row.row_hash = prev = row_digest(row)


@event.listens_for(Session, "before_commit")
def _append_pending(session: Session) -> None:
    rows: list[AuditEvent] = session.info.pop(_PENDING, [])
    if not rows:
        return
    session.flush()  # the transaction's own writes first: the lock is the last thing taken
    chain(rows, locked_head(session))
    session.add_all(rows)


@event.listens_for(Session, "after_transaction_end")
def _drop_pending(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # rolled back (or committed): nothing stays queued
        session.info.pop(_PENDING, None)
