"""posts fetched while [site] require_approval is on wait for `posts approve`; any post not yet sent can be
skipped for good with `posts skip`

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("posts", sa.Column("needs_approval", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column("posts", sa.Column("approved_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("posts", sa.Column("skipped_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("posts") as batch:
        batch.drop_column("skipped_at")
        batch.drop_column("approved_at")
        batch.drop_column("needs_approval")
