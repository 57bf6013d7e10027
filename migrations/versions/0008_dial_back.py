"""dial-back: a session's path may be "dial-back" (issue 11)

`sessions.path` was String(8) for "data", "tunnel" and "peering"; a
session whose device, tunnelled at another node, dialled this relay back is
recorded as "dial-back", nine characters. Widen the column to 16.

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.alter_column('path', existing_type=sa.String(length=8), type_=sa.String(length=16))


def downgrade() -> None:
    op.execute("UPDATE sessions SET path = 'peering' WHERE path = 'dial-back'")
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.alter_column('path', existing_type=sa.String(length=16), type_=sa.String(length=8))
