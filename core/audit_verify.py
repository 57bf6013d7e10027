"""Walk the audit hash chain and name the first row that was edited, removed or reordered.

The walk is in chain order (`seq`), streaming, so a long log costs memory for
one batch only. What it catches, row by row:

- a row whose content no longer matches its hash: edited;
- a row whose hash matches but whose previous hash is not the hash of the row
  before it: that earlier row was edited and its hash recomputed (or replaced);
- a gap in `seq`: rows were removed;
- ids that go down while `seq` goes up: rows were reordered.

What it cannot catch on its own: removing rows at the very end, or rewriting
the whole chain from some row on with freshly computed hashes (SHA-256 has no
key). Keep the reported head (`VerifyResult.head`) somewhere else to catch those.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.audit import GENESIS, row_digest
from core.models import AuditEvent

BATCH = 2000


@dataclass(frozen=True)
class VerifyResult:
    rows: int
    problem: str | None  # one line naming the first broken row, or None when intact
    head: str  # the hash of the last row (GENESIS for an empty log)

    @property
    def intact(self) -> bool:
        return self.problem is None

    def line(self) -> str:
        if self.problem is None:
            return f"audit chain intact: {self.rows} rows"
        return f"audit chain broken: {self.problem}"


def verify(session: Session) -> VerifyResult:
    """Check every row of the chain, oldest first."""
    prev_hash, prev_seq, prev_id = GENESIS, 0, 0
    count = 0
    rows = session.execute(
        select(AuditEvent).order_by(AuditEvent.seq).execution_options(yield_per=BATCH)
    ).scalars()
    for row in rows:
        problem = _check(row, prev_hash, prev_seq, prev_id)
        if problem is not None:
            return VerifyResult(count, problem, prev_hash)
        prev_hash, prev_seq, prev_id = row.row_hash, row.seq, row.id
        count += 1
    return VerifyResult(count, None, prev_hash)


def _check(row: AuditEvent, prev_hash: str, prev_seq: int, prev_id: int) -> str | None:
    if row_digest(row) != row.row_hash:
        return f"row {row.id} was edited (its content does not match its hash)"
    if row.seq > prev_seq + 1:
        first, last = prev_seq + 1, row.seq - 1
        span = (
            f"row at chain position {first} was"
            if first == last
            else (f"rows at chain positions {first}-{last} were")
        )
        where = f"between row {prev_id} and row {row.id}" if prev_id else f"before row {row.id}"
        return f"the {span} removed ({where})"
    if row.seq != prev_seq + 1 or row.id <= prev_id:
        return f"row {row.id} is out of order (chain position {row.seq} after row {prev_id})"
    if row.prev_hash != prev_hash:
        if not prev_id:
            return f"row {row.id} does not start the chain (its previous hash is not the origin)"
        return f"row {prev_id} was edited or replaced (row {row.id} does not link to it)"
    return None
