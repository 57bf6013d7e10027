"""data connections: schema for issue 10 (per-session data connections)

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import core.models

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('data_connections',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('ticket_hash', sa.String(length=64), nullable=False),
    sa.Column('device_id', sa.String(length=32), nullable=False),
    sa.Column('session_id', sa.String(length=32), nullable=False),
    sa.Column('relay_node', sa.String(length=64), nullable=False),
    sa.Column('created_at', core.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', core.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('used_at', core.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('peer_ip', sa.String(length=64), nullable=False),
    sa.Column('peer_port', sa.Integer(), nullable=False),
    sa.Column('transport_port', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], name=op.f('fk_data_connections_device_id_devices')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_data_connections')),
    sa.UniqueConstraint('ticket_hash', name=op.f('uq_data_connections_ticket_hash'))
    )
    with op.batch_alter_table('data_connections', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_data_connections_device_id'), ['device_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_data_connections_session_id'), ['session_id'], unique=False)
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('path', sa.String(length=8), nullable=False, server_default='tunnel'))


def downgrade() -> None:
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.drop_column('path')
    with op.batch_alter_table('data_connections', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_data_connections_session_id'))
        batch_op.drop_index(batch_op.f('ix_data_connections_device_id'))
    op.drop_table('data_connections')
