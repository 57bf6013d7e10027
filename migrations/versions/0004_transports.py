"""transports: schema for issue 12 (tunnel transports)

Revision ID: 0004
Revises: 0003

`tunnels.transport`: how a device's tunnel travels (ssh, ssh+connect, wss,
wss+connect; ws/ws+connect without TLS). Rows from before are raw SSH.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tunnels") as batch:
        batch.add_column(
            sa.Column("transport", sa.String(length=16), nullable=False, server_default="ssh")
        )


def downgrade() -> None:
    with op.batch_alter_table("tunnels") as batch:
        batch.drop_column("transport")
