"""posts keep what a notification shows besides the summary: the author, the featured image, and the
whole content for [site] email_content = "full"

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("posts", sa.Column("content_html", sa.Text(), server_default=sa.text("''"), nullable=False))
    op.add_column("posts", sa.Column("author", sa.String(200), server_default=sa.text("''"), nullable=False))
    op.add_column("posts", sa.Column("image_url", sa.String(2048), server_default=sa.text("''"), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("posts") as batch:
        batch.drop_column("image_url")
        batch.drop_column("author")
        batch.drop_column("content_html")
