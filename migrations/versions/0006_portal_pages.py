"""portal pages: schema for issue 13 (portal pages: users, devices, tokens)

Who ended an SSH session (shown to the technician); revoked enrollment
tokens (listed as revoked, refused by the tracker with that word), their
initial use count, and the portal form that created each (a resubmitted form
creates no second token).

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import core.models

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('sessions') as batch:
        batch.add_column(sa.Column('closed_by', sa.String(length=128), nullable=True))
    with op.batch_alter_table('enroll_tokens') as batch:
        batch.add_column(
            sa.Column('revoked_at', core.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch.add_column(sa.Column('uses_total', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('form_nonce', sa.String(length=64), nullable=True))
        batch.create_unique_constraint('uq_enroll_tokens_form_nonce', ['form_nonce'])


def downgrade() -> None:
    with op.batch_alter_table('enroll_tokens') as batch:
        batch.drop_constraint('uq_enroll_tokens_form_nonce', type_='unique')
        batch.drop_column('form_nonce')
        batch.drop_column('uses_total')
        batch.drop_column('revoked_at')
    with op.batch_alter_table('sessions') as batch:
        batch.drop_column('closed_by')
