"""portal console: schema for issue 13 (audit chain, recordings, approvals)

The audit hash chain covers the rows written before this upgrade too: they are
chained here in id order (seq 1, 2, ...), so `rly audit verify` checks the whole
log, not only what came after the upgrade.

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import core.models
from core.audit import GENESIS, row_digest
from core.models import AuditEvent

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_audit = sa.table(
    'audit_events',
    sa.column('id', sa.Integer()),
    sa.column('at', core.models.UTCDateTime(timezone=True)),
    sa.column('action', sa.String()),
    sa.column('actor', sa.String()),
    sa.column('account_id', sa.Integer()),
    sa.column('target', sa.String()),
    sa.column('detail', sa.Text()),
    sa.column('source_ip', sa.String()),
    sa.column('seq', sa.BigInteger()),
    sa.column('prev_hash', sa.String()),
    sa.column('row_hash', sa.String()),
)


# core.audit.locked_head: the append lock and the chain head in one round trip. Each
# statement of a VOLATILE plpgsql function takes a fresh snapshot, so the head is read
# after the lock was granted (a plain "SELECT lock, head" would read a stale head).
_PG_LOCKED_HEAD = """
CREATE OR REPLACE FUNCTION rly_audit_locked_head(lock_key bigint)
RETURNS TABLE (seq bigint, row_hash varchar) LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    RETURN QUERY SELECT a.seq, a.row_hash::varchar FROM audit_events a ORDER BY a.seq DESC LIMIT 1;
END
$$
"""


def _chain_existing_rows() -> None:
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(
            _audit.c.id, _audit.c.at, _audit.c.action, _audit.c.actor, _audit.c.account_id,
            _audit.c.target, _audit.c.detail, _audit.c.source_ip,
        ).order_by(_audit.c.id)
    ).all()
    prev = GENESIS
    for seq, row in enumerate(rows, start=1):
        event = AuditEvent(
            at=row.at, action=row.action, actor=row.actor, account_id=row.account_id,
            target=row.target, detail=row.detail, source_ip=row.source_ip,
            seq=seq, prev_hash=prev,
        )
        digest = row_digest(event)
        bind.execute(
            _audit.update()
            .where(_audit.c.id == row.id)
            .values(seq=seq, prev_hash=prev, row_hash=digest)
        )
        prev = digest


def upgrade() -> None:
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('seq', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('prev_hash', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('row_hash', sa.String(length=64), nullable=True))
    _chain_existing_rows()
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.alter_column('seq', existing_type=sa.BigInteger(), nullable=False)
        batch_op.alter_column('prev_hash', existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column('row_hash', existing_type=sa.String(length=64), nullable=False)
        batch_op.create_unique_constraint(batch_op.f('uq_audit_events_seq'), ['seq'])
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(_PG_LOCKED_HEAD)
    _approvals_upgrade()


def _approvals_upgrade() -> None:
    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('second_approver', sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table('approvals', schema=None) as batch_op:
        batch_op.add_column(sa.Column('key_fingerprint', sa.String(length=128), nullable=True))
        batch_op.add_column(
            sa.Column('decided_via', sa.String(length=16), nullable=False, server_default='portal')
        )
    op.create_table('approval_grants',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('approval_id', sa.Integer(), nullable=True),
    sa.Column('ssh_login', sa.String(length=64), nullable=False),
    sa.Column('key_fingerprint', sa.String(length=128), nullable=False),
    sa.Column('client_ip', sa.String(length=64), nullable=False),
    sa.Column('created_at', core.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', core.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('uses', sa.Integer(), nullable=False),
    sa.Column('last_used_at', core.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', core.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('revoked_by', sa.String(length=128), nullable=True),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_approval_grants_account_id_accounts')),
    sa.ForeignKeyConstraint(['approval_id'], ['approvals.id'], name=op.f('fk_approval_grants_approval_id_approvals')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_approval_grants_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_approval_grants'))
    )
    with op.batch_alter_table('approval_grants', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_approval_grants_account_id'), ['account_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_approval_grants_expires_at'), ['expires_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_approval_grants_user_id'), ['user_id'], unique=False)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('DROP FUNCTION IF EXISTS rly_audit_locked_head(bigint)')
    with op.batch_alter_table('approval_grants', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_approval_grants_user_id'))
        batch_op.drop_index(batch_op.f('ix_approval_grants_expires_at'))
        batch_op.drop_index(batch_op.f('ix_approval_grants_account_id'))
    op.drop_table('approval_grants')
    with op.batch_alter_table('approvals', schema=None) as batch_op:
        batch_op.drop_column('decided_via')
        batch_op.drop_column('key_fingerprint')
    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.drop_column('second_approver')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_audit_events_seq'), type_='unique')
        batch_op.drop_column('row_hash')
        batch_op.drop_column('prev_hash')
        batch_op.drop_column('seq')
