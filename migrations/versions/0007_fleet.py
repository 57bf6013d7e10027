"""fleet: schema for issue 11 (multi-node fleet)

The relay node registry gains its heartbeat interval, load (tunnels,
sessions), drain state and deadline, and when it was declared gone.

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import core.models

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ('heartbeat_interval', 'tunnels', 'sessions', 'state', 'drain_deadline', 'gone_at')


def upgrade() -> None:
    with op.batch_alter_table('relay_nodes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('heartbeat_interval', sa.Float(), nullable=False, server_default='5'))
        batch_op.add_column(sa.Column('tunnels', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('sessions', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('state', sa.String(length=16), nullable=False, server_default='live'))
        batch_op.add_column(sa.Column('drain_deadline', core.models.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('gone_at', core.models.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('relay_nodes', schema=None) as batch_op:
        for name in reversed(COLUMNS):
            batch_op.drop_column(name)
