"""`newsletter stats`: the state of the list and of the mail waiting to go, as counts."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import func, or_, select

from .models import OutboxMessage, Post, Signup, Status, Subscriber
from .runtime import Newsletter
from .subscriptions import ceiling


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
        )
