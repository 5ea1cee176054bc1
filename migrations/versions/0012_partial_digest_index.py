"""deliveries' digest index only for rows that are in a digest: a notification's two updates (sending,
then sent) no longer add an entry for its empty digest_id each time

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

IN_A_DIGEST = sa.text("digest_id IS NOT NULL")


def upgrade() -> None:
    op.drop_index("ix_deliveries_digest", table_name="deliveries")
    op.create_index(
        "ix_deliveries_digest",
        "deliveries",
        ["digest_id"],
        sqlite_where=IN_A_DIGEST,
        postgresql_where=IN_A_DIGEST,
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_digest", table_name="deliveries")
    op.create_index("ix_deliveries_digest", "deliveries", ["digest_id"])
