"""a sign-up by an existing subscriber waits in pending_* until its confirmation is clicked, so it never
overwrites their status or consent record

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("subscribers", sa.Column("pending_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("subscribers", sa.Column("pending_ip", sa.String(length=64), nullable=True))
    op.add_column("subscribers", sa.Column("pending_user_agent", sa.String(length=512), nullable=True))
    op.create_index("ix_subscribers_pending_at", "subscribers", ["pending_at"])


def downgrade() -> None:
    op.drop_index("ix_subscribers_pending_at", table_name="subscribers")
    op.drop_column("subscribers", "pending_user_agent")
    op.drop_column("subscribers", "pending_ip")
    op.drop_column("subscribers", "pending_at")
