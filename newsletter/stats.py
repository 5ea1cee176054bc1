"""`newsletter stats`: the state of the list and of the mail waiting to go, as counts. No opens or clicks:
nothing in the emails tracks the reader."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, case, func, or_, select
from sqlalchemy.orm import Session

from .config import FREQUENCIES
from .models import Delivery, DeliveryStatus, Digest, OutboxMessage, Post, Signup, Status, Subscriber, utcnow
from .runtime import Newsletter
from .subscriptions import ceiling

GROWTH_WEEKS = 8
POSTS_SHOWN = 10
LEFT_WITHIN = timedelta(days=7)


@dataclass(frozen=True)
class Week:
    """Readers who confirmed, and who unsubscribed, in the week starting on Monday `start`."""

    start: datetime
    confirmed: int
    left: int


@dataclass(frozen=True)
class PostOutcome:
    """How one post's emails went: sent, failed, bounced (refused for readers now bounced, or returned later as a
    bounce), and readers who got it and unsubscribed while it was being sent or within LEFT_WITHIN after."""

    id: int
    title: str
    sent_at: datetime
    sent: int
    failed: int
    bounced: int
    unsubscribed: int


@dataclass(frozen=True)
class Stats:
    subscribers: dict[Status, int]
    posts: int
    posts_waiting: int
    signups_unrecorded: int
    unconfirmed: int  # sign-ups waiting for their confirmation to be clicked
    unconfirmed_days: int
    outbox_queued: dict[str, int]  # by kind of email
    outbox_held: int
    signups_last_hour: int
    signup_ceiling: int
    network_ceiling: int
    flooded: bool  # some network, or the whole form, is over its ceiling
    frequencies: dict[str, int]  # confirmed readers by how often they get email
    growth: list[Week]  # oldest first
    recent_posts: list[PostOutcome]  # the POSTS_SHOWN posts last sent, newest first

    @property
    def holding(self) -> bool:
        """Whether confirmation emails are being held because of a flood of sign-ups."""
        return self.flooded or self.outbox_held > 0


def collect(nl: Newsletter) -> Stats:
    queued = (
        select(OutboxMessage.kind, func.count())
        .where(OutboxMessage.sent_at.is_(None), OutboxMessage.failed_at.is_(None), OutboxMessage.held.is_(False))
        .group_by(OutboxMessage.kind)
    )
    limits, now = ceiling(nl), time.time()
    with nl.sessions() as session:
        conn = session.connection()
        counts = dict(session.execute(select(Subscriber.status, func.count()).group_by(Subscriber.status)).all())
        return Stats(
            subscribers={status: counts.get(status, 0) for status in Status},
            posts=session.scalar(select(func.count()).select_from(Post)) or 0,
            posts_waiting=session.scalar(select(func.count()).select_from(Post).where(Post.announced_at.is_(None)))
            or 0,
            signups_unrecorded=session.scalar(
                select(func.count()).select_from(Signup).where(Signup.processed_at.is_(None))
            )
            or 0,
            unconfirmed=session.scalar(
                select(func.count())
                .select_from(Subscriber)
                .where(or_(Subscriber.status == Status.UNCONFIRMED, Subscriber.pending_at.is_not(None)))
            )
            or 0,
            unconfirmed_days=nl.config.web.unconfirmed_days,
            outbox_queued=dict(session.execute(queued).all()),
            outbox_held=session.scalar(
                select(func.count()).select_from(OutboxMessage).where(OutboxMessage.held.is_(True))
            )
            or 0,
            signups_last_hour=limits.recent(conn, now),
            signup_ceiling=limits.total,
            network_ceiling=limits.per_network,
            flooded=limits.flooded(conn, now),
            frequencies=_frequencies(session),
            growth=_growth(session),
            recent_posts=[_outcome(session, post) for post in _recent_posts(session)],
        )


def _frequencies(session: Session) -> dict[str, int]:
    counts = session.execute(
        select(Subscriber.frequency, func.count())
        .where(Subscriber.status == Status.CONFIRMED)
        .group_by(Subscriber.frequency)
    )
    found: dict[str, int] = dict(counts.all())
    return {frequency: found.get(frequency, 0) for frequency in FREQUENCIES}


def _count(condition: ColumnElement[bool]) -> ColumnElement[int]:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def _growth(session: Session) -> list[Week]:
    """The last GROWTH_WEEKS weeks (Monday to Sunday, UTC), this one last."""
    today = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
    starts = [today - timedelta(days=today.weekday(), weeks=back) for back in reversed(range(GROWTH_WEEKS))]
    bounds = [*starts, starts[-1] + timedelta(weeks=1)]
    sums = []
    for column in (Subscriber.confirmed_at, Subscriber.unsubscribed_at):
        sums += [_count(and_(column >= start, column < end)) for start, end in zip(bounds, bounds[1:], strict=False)]
    row = session.execute(
        select(*sums).where(or_(Subscriber.confirmed_at >= starts[0], Subscriber.unsubscribed_at >= starts[0]))
    ).one()
    return [Week(start, row[i], row[i + GROWTH_WEEKS]) for i, start in enumerate(starts)]


def _recent_posts(session: Session) -> list[Post]:
    sent = func.coalesce(Post.announced_at, Post.queued_at)
    query = select(Post).where(Post.queued_at.is_not(None)).order_by(sent.desc(), Post.id.desc()).limit(POSTS_SHOWN)
    return list(session.scalars(query))


def _outcome(session: Session, post: Post) -> PostOutcome:
    """A post's deliveries, each sent or failed on its own or in the digest it went in."""
    started, sent_at = post.queued_at, post.announced_at or post.queued_at
    assert started is not None and sent_at is not None
    got = or_(
        Delivery.status == DeliveryStatus.SENT,
        and_(Delivery.status == DeliveryStatus.DIGESTED, Digest.status == DeliveryStatus.SENT),
    )
    failed = or_(
        Delivery.status == DeliveryStatus.FAILED,
        and_(Delivery.status == DeliveryStatus.DIGESTED, Digest.status == DeliveryStatus.FAILED),
    )
    left = and_(Subscriber.unsubscribed_at >= started, Subscriber.unsubscribed_at < sent_at + LEFT_WITHIN)
    row = session.execute(
        select(
            _count(got),
            _count(failed),
            _count(
                or_(
                    and_(failed, Subscriber.status == Status.BOUNCED),
                    Delivery.bounced_at.is_not(None),
                    Digest.bounced_at.is_not(None),
                )
            ),
            _count(and_(got, left)),
        )
        .select_from(Delivery)
        .outerjoin(Digest, Digest.id == Delivery.digest_id)
        .outerjoin(Subscriber, Subscriber.id == Delivery.subscriber_id)
        .where(Delivery.post_id == post.id)
    ).one()
    return PostOutcome(post.id, post.title, sent_at, *row)
