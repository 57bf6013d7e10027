"""defects: no schema change (issue 9's fixes needed none)

Reserved for issue 9 while its work was under way; kept as a no-op so that the
revisions after it keep their numbers.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
