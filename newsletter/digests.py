"""Daily and weekly digests: when each is due, which posts go in it, and its email.

A post queued for a reader on daily or weekly email waits in `deliveries` (status `waiting`). When the
reader's digest is due, their waiting posts become one `digests` row and the deliveries point to it
(status `digested`), all in one transaction: a post is in at most one digest, and a digest, once made,
is sent like a notification (dispatch.py).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, Connection, and_, case, func, insert, literal, or_, select, update

from . import db
from .config import WEEKDAYS, DigestConfig
from .messages import MessageTemplate, digest_template
from .models import DELIVERIES, DIGESTS, SUBSCRIBERS, DeliveryStatus, Post, Status, UTCDateTime, utcnow
from .runtime import Newsletter

CATCH_UP = "instant"  # a reader who went back to instant email gets what waited for them at once


def periods(config: DigestConfig, now: datetime) -> dict[str, datetime]:
    """The start (UTC) of the current daily and weekly period at NOW: the latest send_hour, and the latest
    send_hour on weekday, in the configured time zone, at or before NOW."""
    zone = ZoneInfo(config.timezone)
    local = now.astimezone(zone)
    today = datetime.combine(local.date(), time(config.send_hour), tzinfo=zone)
    daily = today if local >= today else today - timedelta(days=1)
    weekly = today - timedelta(days=(local.weekday() - WEEKDAYS.index(config.weekday)) % 7)
    if weekly > local:
        weekly -= timedelta(days=7)
    return {"daily": daily.astimezone(UTC), "weekly": weekly.astimezone(UTC)}


def _due(current: dict[str, datetime]) -> ColumnElement[bool]:
    """Confirmed readers whose digest is due: daily or weekly ones not yet served this period, and readers
    back on instant email (their waiting posts, if any, go out at once).

    Served means a digest made at or after the period's start, or `digest_at` (the period last found with
    nothing waiting) at or after it. A digest made marks only its own row, not the reader's.
    """
    period = _start(SUBSCRIBERS.c.frequency, current)
    made = select(DIGESTS.c.id).where(DIGESTS.c.subscriber_id == SUBSCRIBERS.c.id, DIGESTS.c.period >= period)
    served = SUBSCRIBERS.c.digest_at
    return and_(
        SUBSCRIBERS.c.status == Status.CONFIRMED,
        or_(
            *(
                and_(SUBSCRIBERS.c.frequency == frequency, or_(served.is_(None), served < start))
                for frequency, start in current.items()
            ),
            SUBSCRIBERS.c.frequency == CATCH_UP,
        ),
        ~made.exists(),
    )


def _start(
    frequency: ColumnElement[str], current: dict[str, datetime], otherwise: datetime | None = None
) -> ColumnElement[datetime]:
    """The start of the current period of the frequency in FREQUENCY; OTHERWISE (or NULL) for any other."""
    whens = [(frequency == name, literal(start, UTCDateTime())) for name, start in current.items()]
    return case(*whens, else_=None if otherwise is None else literal(otherwise, UTCDateTime()))


def lock(conn: Connection) -> None:
    """Queueing posts and making digests take turns, so every waiting post seen is the one attached."""
    db.advisory_xact_lock(conn, "digests")


def _parse(contents: str) -> tuple[str, list[int]]:
    frequency, _, ids = contents.partition(":")
    return frequency, [int(i) for i in ids.split(",")]


READERS_PER_TRANSACTION = 20_000


def assemble(nl: Newsletter, now: datetime) -> Iterator[int]:
    """Make every digest due at NOW from the posts waiting for it, in one transaction for each
    READERS_PER_TRANSACTION readers (by id); yields how many digests each made, once it is committed, so
    they can be sent while the next are made.

    Readers due with nothing waiting are marked served all the same: a period without posts sends nothing.
    """
    current = periods(nl.config.digest, now)
    after: int | None = 0
    analysed = False
    while after is not None:
        with nl.engine.begin() as conn:
            lock(conn)
            last = conn.scalar(
                select(SUBSCRIBERS.c.id)
                .where(SUBSCRIBERS.c.id > after)
                .order_by(SUBSCRIBERS.c.id)
                .offset(READERS_PER_TRANSACTION - 1)
                .limit(1)
            )
            span = SUBSCRIBERS.c.id > after if last is None else SUBSCRIBERS.c.id.between(after + 1, last)
            made = _assemble(conn, current, now, and_(_due(current), span))
        if made and not analysed:
            db.refresh_statistics(nl.engine, DIGESTS.name)
            analysed = True
        after = last
        yield made


def _assemble(conn: Connection, current: dict[str, datetime], now: datetime, due: ColumnElement[bool]) -> int:
    """The digests of the readers DUE selects, in CONN's transaction; returns how many were made."""
    before = conn.scalar(select(func.max(DIGESTS.c.id))) or 0
    waiting = (
        select(DELIVERIES.c.subscriber_id, SUBSCRIBERS.c.frequency, DELIVERIES.c.post_id)
        .join(SUBSCRIBERS, SUBSCRIBERS.c.id == DELIVERIES.c.subscriber_id)
        .where(DELIVERIES.c.status == DeliveryStatus.WAITING, due)
        .order_by(DELIVERIES.c.subscriber_id, DELIVERIES.c.post_id)
        .subquery()
    )
    period = _start(waiting.c.frequency, current, otherwise=now)
    contents = waiting.c.frequency + ":" + db.joined_in_order(waiting.c.post_id, conn)  # "daily:3,5,8"
    conn.execute(
        insert(DIGESTS).from_select(
            ["subscriber_id", "period", "contents", "status"],
            select(waiting.c.subscriber_id, period, contents, literal(DeliveryStatus.PENDING.value)).group_by(
                waiting.c.subscriber_id, waiting.c.frequency
            ),
        )
    )
    made = conn.scalar(select(func.count()).where(DIGESTS.c.id > before)) or 0
    if made:
        conn.execute(
            update(DELIVERIES)
            .where(
                DELIVERIES.c.status == DeliveryStatus.WAITING,
                DIGESTS.c.subscriber_id == DELIVERIES.c.subscriber_id,
                DIGESTS.c.id > before,
            )
            .values(status=DeliveryStatus.DIGESTED, digest_id=DIGESTS.c.id)
        )
    for frequency, start in current.items():
        conn.execute(update(SUBSCRIBERS).where(due, SUBSCRIBERS.c.frequency == frequency).values(digest_at=start))
    return made


@dataclass(frozen=True)
class Upcoming:
    """What `send --dry-run` says of digests: readers whose digest is due and has posts, by frequency."""

    readers: dict[str, int]


def upcoming(nl: Newsletter, now: datetime, new_posts: int) -> Upcoming:
    """Digests due at NOW with posts in them, counting the NEW_POSTS not yet queued as waiting for all."""
    due = _due(periods(nl.config.digest, now))
    has_posts = select(DELIVERIES.c.id).where(
        DELIVERIES.c.subscriber_id == SUBSCRIBERS.c.id, DELIVERIES.c.status == DeliveryStatus.WAITING
    )
    if not new_posts:
        due = and_(due, has_posts.exists())
    else:
        due = and_(due, or_(SUBSCRIBERS.c.frequency != CATCH_UP, has_posts.exists()))
    with nl.engine.connect() as conn:
        counts = conn.execute(
            select(SUBSCRIBERS.c.frequency, func.count()).where(due).group_by(SUBSCRIBERS.c.frequency)
        ).all()
    return Upcoming({frequency: count for frequency, count in counts})


class Renderer:
    """Digest emails, rendered once per distinct contents and kept for the run (the sender's connections
    share it)."""

    def __init__(self, nl: Newsletter) -> None:
        self.nl = nl
        self._templates: dict[str, MessageTemplate] = {}
        self._seeds: dict[str, str] = {}
        self._posts: dict[int, Post] = {}
        self._lock = threading.Lock()

    def template(self, contents: str) -> MessageTemplate:
        with self._lock:
            if contents not in self._templates:
                frequency, ids = _parse(contents)
                posts = self.posts(ids)
                self._templates[contents] = digest_template(
                    self.nl.config, self.nl.render, self.nl.language, frequency, posts
                )
                secret = self.nl.config.security.secret_key
                self._seeds[contents] = hashlib.sha256(f"{secret}:{contents}".encode()).hexdigest()[:16]
            return self._templates[contents]

    def message_id(self, digest_id: int, contents: str) -> str:
        """The same for every attempt at one digest, so a resend after a crash is recognisably a duplicate."""
        domain = self.template(contents).domain
        return f"<digest.{digest_id}.{self._seeds[contents]}@{domain}>"

    def posts(self, ids: Sequence[int]) -> list[Post]:
        """The posts with IDS, oldest first."""
        missing = [i for i in ids if i not in self._posts]
        if missing:
            with self.nl.sessions() as session:
                for post in session.scalars(select(Post).where(Post.id.in_(missing))):
                    session.expunge(post)
                    self._posts[post.id] = post
        found = [self._posts[i] for i in ids if i in self._posts]
        return sorted(found, key=lambda p: (p.published_at or p.created_at, p.id))


def sample_posts(nl: Newsletter, frequency: str) -> list[Post]:
    """What a FREQUENCY digest made now would show: the posts of the last day or week, else the latest
    post; oldest first."""
    since = utcnow() - timedelta(days=7 if frequency == "weekly" else 1)
    when = func.coalesce(Post.published_at, Post.created_at)
    with nl.sessions() as session:
        recent = list(session.scalars(select(Post).where(when >= since).order_by(when, Post.id)))
        if not recent:
            recent = list(session.scalars(select(Post).order_by(when.desc(), Post.id.desc()).limit(1)))
        session.expunge_all()
    return recent
