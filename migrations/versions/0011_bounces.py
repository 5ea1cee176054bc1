"""mail that comes back: a reader's bounce score and complaint, and which sent emails bounced later

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("subscribers", sa.Column("bounce_score", sa.Float(), server_default=sa.text("0"), nullable=False))
    op.add_column("subscribers", sa.Column("last_bounce_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("subscribers", sa.Column("complained_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("deliveries", sa.Column("bounced_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("digests", sa.Column("bounced_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for table in ("digests", "deliveries"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("bounced_at")
    with op.batch_alter_table("subscribers") as batch:
        batch.drop_column("complained_at")
        batch.drop_column("last_bounce_at")
        batch.drop_column("bounce_score")
