"""Read-only queries behind the allowlist page (the other pages keep theirs in pages/)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import AllowlistEntry


def allowlist(session: Session, account_id: int) -> list[AllowlistEntry]:
    return list(
        session.scalars(
            select(AllowlistEntry)
            .where(AllowlistEntry.account_id == account_id)
            .order_by(AllowlistEntry.cidr)
        )
    )
