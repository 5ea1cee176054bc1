"""The database tables, as SQLAlchemy 2 typed models. The schema itself is made by migrations/."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class Status(str, enum.Enum):
    UNCONFIRMED = "unconfirmed"
    CONFIRMED = "confirmed"
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"


class Subscriber(Base):
    __tablename__ = "subscribers"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320))
    email_key: Mapped[str] = mapped_column(String(320), unique=True)
    email_ascii: Mapped[str] = mapped_column(String(320))
    status: Mapped[Status] = mapped_column(
        Enum(Status, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])
    )
    confirm_nonce: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    subscribed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    subscribed_ip: Mapped[str | None] = mapped_column(String(64))
    subscribed_user_agent: Mapped[str | None] = mapped_column(String(512))
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    confirmed_ip: Mapped[str | None] = mapped_column(String(64))
    confirmed_user_agent: Mapped[str | None] = mapped_column(String(512))
    unsubscribed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    unsubscribed_ip: Mapped[str | None] = mapped_column(String(64))
    unsubscribed_user_agent: Mapped[str | None] = mapped_column(String(512))
    # A sign-up by an address already on the list, kept apart until its confirmation is clicked.
    pending_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    pending_ip: Mapped[str | None] = mapped_column(String(64))
    pending_user_agent: Mapped[str | None] = mapped_column(String(512))
    frequency: Mapped[str] = mapped_column(String(8), server_default=text("'instant'"))  # config.FREQUENCIES
    digest_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # the digest period last served
    bounce_score: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))  # inbound.py
    last_bounce_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    complained_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # reported one of our emails as spam

    __table_args__ = (
        Index("ix_subscribers_status", "status"),
        Index("ix_subscribers_subscribed_at", "subscribed_at"),
        Index("ix_subscribers_pending_at", "pending_at"),
        {"sqlite_autoincrement": True},
    )


class Erased(Base):
    """An address erased at its reader's request: only a keyed hash (manage.erased_key), so that nobody can
    read the address back, and an import cannot add it again unknowingly."""

    __tablename__ = "erased"

    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    erased_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SubscriberCategory(Base):
    """A category a reader chose; a reader with none gets every post."""

    __tablename__ = "subscriber_categories"

    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscribers.id", ondelete="CASCADE"), primary_key=True)
    category: Mapped[str] = mapped_column(String(200), primary_key=True)  # casefolded: categories.key()


class Post(Base):
    __tablename__ = "posts"

    id: Mapped[int] = mapped_column(primary_key=True)
    guid: Mapped[str] = mapped_column(String(2048), unique=True)
    source: Mapped[str] = mapped_column(String(16), default="feed")
    url: Mapped[str] = mapped_column(String(2048))
    title: Mapped[str] = mapped_column(String(1024))
    summary_html: Mapped[str] = mapped_column(Text, default="")
    content_html: Mapped[str] = mapped_column(Text, default="", server_default=text("''"))
    author: Mapped[str] = mapped_column(String(200), default="", server_default=text("''"))
    image_url: Mapped[str] = mapped_column(String(2048), default="", server_default=text("''"))  # the featured image
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    announced_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    message_seed: Mapped[str | None] = mapped_column(String(32))
    categories: Mapped[list[str] | None] = mapped_column(JSON, default=list)  # as the feed entry names them
    needs_approval: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    skipped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # never to be sent

    @property
    def announced(self) -> bool:
        return self.announced_at is not None

    @property
    def state(self) -> str:
        """What `posts list` shows: skipped, announced, sending, awaiting approval or new."""
        if self.skipped_at is not None:
            return "skipped"
        if self.announced_at is not None:
            return "announced"
        if self.queued_at is not None:
            return "sending"
        if self.needs_approval and self.approved_at is None:
            return "awaiting approval"
        return "new"


class DeliveryStatus(str, enum.Enum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"
    WAITING = "waiting"  # for the reader's next digest
    DIGESTED = "digested"  # in digest `digest_id`, which has its own status


class LedgerRow:
    """The columns of a row of a send ledger (deliveries, digests): how its email is doing, and which sender
    holds it while it is `sending`."""

    status: Mapped[DeliveryStatus] = mapped_column(
        Enum(DeliveryStatus, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]),
        default=DeliveryStatus.PENDING,
    )
    error: Mapped[str | None] = mapped_column(String(1024))
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    claimed_by: Mapped[int | None] = mapped_column(BigInteger)
    bounced_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # a bounce about it came back later


class Delivery(LedgerRow, Base):
    """One notification of one post to one subscriber: the send ledger and queue.

    No foreign keys: checking them would double the time to queue a post for a million readers, and
    the rows are only ever created from existing posts and subscribers and deleted with the subscriber
    (subscriptions.remove).
    """

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(primary_key=True)
    post_id: Mapped[int] = mapped_column(Integer)
    subscriber_id: Mapped[int] = mapped_column(Integer)
    digest_id: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        UniqueConstraint("post_id", "subscriber_id", name="uq_deliveries_post_subscriber"),
        Index(
            "ix_deliveries_pending",
            "post_id",
            "id",
            sqlite_where=text("status = 'pending'"),
            postgresql_where=text("status = 'pending'"),
        ),
        Index(
            "ix_deliveries_sending",
            "claimed_by",
            sqlite_where=text("status = 'sending'"),
            postgresql_where=text("status = 'sending'"),
        ),
        Index("ix_deliveries_subscriber", "subscriber_id"),
        Index(
            "ix_deliveries_waiting",
            "subscriber_id",
            sqlite_where=text("status = 'waiting'"),
            postgresql_where=text("status = 'waiting'"),
        ),
        Index(
            "ix_deliveries_digest",
            "digest_id",
            sqlite_where=text("digest_id IS NOT NULL"),
            postgresql_where=text("digest_id IS NOT NULL"),
        ),
    )


class Digest(LedgerRow, Base):
    """One daily or weekly email to one reader, of the posts that waited for it (deliveries.digest_id).

    Sent like a delivery: pending -> sending -> sent or failed. `contents` is the frequency and the post
    ids, so readers with the same posts share one rendering.
    """

    __tablename__ = "digests"

    id: Mapped[int] = mapped_column(primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(Integer)
    period: Mapped[datetime] = mapped_column(UTCDateTime)
    contents: Mapped[str] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("subscriber_id", "period", name="uq_digests_subscriber_period"),
        Index(
            "ix_digests_pending",
            "id",
            sqlite_where=text("status = 'pending'"),
            postgresql_where=text("status = 'pending'"),
        ),
        Index(
            "ix_digests_sending",
            "claimed_by",
            sqlite_where=text("status = 'sending'"),
            postgresql_where=text("status = 'sending'"),
        ),
    )


class Signup(Base):
    """A sign-up form the web accepted: the worker records the subscriber and queues the email, then marks it
    processed. Kept as long as [web] rate_limit looks back, to count each client's sign-ups.

    Times are time.time() floats: the form's handler binds them as they are.
    """

    __tablename__ = "signups"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320))
    ip: Mapped[str] = mapped_column(String(64))
    client: Mapped[str | None] = mapped_column(String(64))  # what [web] rate_limit counts
    network: Mapped[str | None] = mapped_column(String(64))  # what the sign-up ceilings count
    user_agent: Mapped[str | None] = mapped_column(String(512))
    received_at: Mapped[float] = mapped_column(Float)
    processed_at: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (
        Index("ix_signups_client_received_at", "client", "received_at"),
        Index("ix_signups_network_received_at", "network", "received_at"),
        Index("ix_signups_received_at", "received_at"),
        Index(
            "ix_signups_unprocessed",
            "id",
            sqlite_where=text("processed_at IS NULL"),
            postgresql_where=text("processed_at IS NULL"),
        ),
    )


class OutboxMessage(Base):
    """A rendered one-off email (confirmation, welcome) waiting to be delivered by a sender."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(primary_key=True)
    subscriber_id: Mapped[int | None] = mapped_column(ForeignKey("subscribers.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    sender: Mapped[str] = mapped_column(String(320))
    recipient: Mapped[str] = mapped_column(String(320))
    message: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(String(1024))
    held: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    __table_args__ = (Index("ix_outbox_pending", "sent_at", "failed_at", "next_attempt_at"),)


class Confirmation(Base):
    """A confirmation email sent, kept to throttle sign-ups per address (with +tag variants grouped)."""

    __tablename__ = "confirmations"

    id: Mapped[int] = mapped_column(primary_key=True)
    throttle_key: Mapped[str] = mapped_column(String(320), index=True)
    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscribers.id", ondelete="CASCADE"), index=True)
    sent_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# The Core tables, for statements written without the ORM. Typed as Table: mypy sees a model's __table__
# only as a FromClause, which update(), insert(), delete() and db.claim() do not accept.
SUBSCRIBERS = cast(Table, Subscriber.__table__)
DELIVERIES = cast(Table, Delivery.__table__)
SIGNUPS = cast(Table, Signup.__table__)
DIGESTS = cast(Table, Digest.__table__)
SUBSCRIBER_CATEGORIES = cast(Table, SubscriberCategory.__table__)
ERASED = cast(Table, Erased.__table__)
OUTBOX = cast(Table, OutboxMessage.__table__)
CONFIRMATIONS = cast(Table, Confirmation.__table__)
