"""the sign-up log records each sign-up's client (an IPv6 client counts by its /64) and network (an IPv4
/24, an IPv6 /48), so a flood holds only its own networks' confirmation emails

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("signups") as batch:
        batch.add_column(sa.Column("client", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("network", sa.String(length=64), nullable=True))
        batch.drop_index("ix_signups_ip_received_at")
        batch.create_index("ix_signups_client_received_at", ["client", "received_at"])
        batch.create_index("ix_signups_network_received_at", ["network", "received_at"])
        batch.create_index("ix_signups_received_at", ["received_at"])
    op.execute("UPDATE signups SET client = ip, network = ip")


def downgrade() -> None:
    with op.batch_alter_table("signups") as batch:
        batch.drop_index("ix_signups_received_at")
        batch.drop_index("ix_signups_network_received_at")
        batch.drop_index("ix_signups_client_received_at")
        batch.create_index("ix_signups_ip_received_at", ["ip", "received_at"])
        batch.drop_column("network")
        batch.drop_column("client")
