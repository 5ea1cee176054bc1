"""readers choose instant, daily or weekly email: a post waits in deliveries for a reader's digest, and each
digest is a row with its own send status; posts carry their feed categories, and readers may choose some;
a reader may erase themselves, leaving only a keyed hash of the address

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

STATUS = sa.Enum(
    "pending",
    "sending",
    "sent",
    "failed",
    "skipped",
    "waiting",
    "digested",
    name="deliverystatus",
    native_enum=False,
    length=16,
)


def _partial(status: str) -> dict[str, sa.TextClause]:
    return {"sqlite_where": sa.text(f"status = '{status}'"), "postgresql_where": sa.text(f"status = '{status}'")}


def upgrade() -> None:
    op.add_column("subscribers", sa.Column("frequency", sa.String(length=8), server_default="instant", nullable=False))
    op.add_column("subscribers", sa.Column("digest_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("deliveries", sa.Column("digest_id", sa.Integer(), nullable=True))
    op.create_index("ix_deliveries_waiting", "deliveries", ["subscriber_id"], **_partial("waiting"))
    op.create_index("ix_deliveries_digest", "deliveries", ["digest_id"])
    op.create_table(
        "digests",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("subscriber_id", sa.Integer(), nullable=False),
        sa.Column("period", sa.DateTime(timezone=True), nullable=False),
        sa.Column("contents", sa.Text(), nullable=False),
        sa.Column("status", STATUS, nullable=False),
        sa.Column("error", sa.String(length=1024), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_by", sa.BigInteger(), nullable=True),
        sa.UniqueConstraint("subscriber_id", "period", name="uq_digests_subscriber_period"),
    )
    op.create_index("ix_digests_pending", "digests", ["id"], **_partial("pending"))
    op.create_index("ix_digests_sending", "digests", ["claimed_by"], **_partial("sending"))
    op.add_column("posts", sa.Column("categories", sa.JSON(), nullable=True))
    op.create_table(
        "subscriber_categories",
        sa.Column("subscriber_id", sa.Integer(), nullable=False),
        sa.Column("category", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(["subscriber_id"], ["subscribers.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("subscriber_id", "category"),
    )
    op.create_table(
        "erased",
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key_hash"),
    )


def downgrade() -> None:
    op.drop_table("erased")
    op.drop_table("subscriber_categories")
    with op.batch_alter_table("posts") as batch:
        batch.drop_column("categories")
    op.drop_table("digests")
    op.drop_index("ix_deliveries_digest", table_name="deliveries")
    op.drop_index("ix_deliveries_waiting", table_name="deliveries")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("digest_id")
    with op.batch_alter_table("subscribers") as batch:
        batch.drop_column("digest_at")
        batch.drop_column("frequency")
