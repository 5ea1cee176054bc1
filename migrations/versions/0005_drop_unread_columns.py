"""drop columns nothing read: subscribers.confirm_sent_at (the confirmations table records each email
sent) and deliveries.attempts

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35 and later): neither column is indexed, and rebuilding
    # the deliveries table of a large list would take long.
    op.drop_column("subscribers", "confirm_sent_at")
    op.drop_column("deliveries", "attempts")


def downgrade() -> None:
    op.add_column("deliveries", sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("subscribers", sa.Column("confirm_sent_at", sa.DateTime(timezone=True), nullable=True))
