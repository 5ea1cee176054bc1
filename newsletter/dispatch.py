"""The sending engine for new-post notifications.

Every (post, subscriber) pair is a row in `deliveries`, created in one INSERT ... SELECT when a post is
queued. Senders claim rows in batches (pending -> sending), hand the batch to one SMTP connection and
record each outcome (sent, failed, or back to pending). A row is marked `sending` only while its batch
is on the wire, so after a crash only that batch can be ambiguous: the next run sends it again with the
same Message-ID and counts it as possibly duplicated. Nothing is ever skipped.
"""

from __future__ import annotations

import functools
import os
import re
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    CursorResult,
    Table,
    and_,
    bindparam,
    case,
    func,
    insert,
    literal,
    or_,
    select,
    true,
    update,
)

from . import categories, couriers, db, digests, threads
from .couriers import Courier, CourierLost, Letter
from .mailer import Envelope, MailerError, Outcome, Result
from .messages import MessageTemplate, digest_template, notification_template
from .models import (
    DELIVERIES,
    DIGESTS,
    OUTBOX,
    SUBSCRIBERS,
    Delivery,
    DeliveryStatus,
    Post,
    Status,
    Subscriber,
    utcnow,
)
from .runtime import Newsletter

RETRY_PASSES_AFTER = (timedelta(seconds=1), timedelta(seconds=5))  # within one run, for 4xx and lost replies
POLICY_REJECTION = re.compile(r"^5\d\d[ -]5\.7\.")
MAX_LISTED_FAILURES = 20
LEDGERS = (DELIVERIES, DIGESTS)
RECIPIENT = (SUBSCRIBERS.c.id, SUBSCRIBERS.c.email_ascii, SUBSCRIBERS.c.status)
CLAIM_KEYS = ("status", "claimed_by", "updated_at")  # what claiming a row sets


@dataclass
class SendReport:
    posts: int = 0
    digests: int = 0
    sent: int = 0
    failed: int = 0
    skipped: int = 0
    deferred: int = 0
    resent: int = 0
    quota_reached: bool = False
    error: str | None = None
    stopped_by: KeyboardInterrupt | None = None  # Ctrl-C or a stop signal: batches in flight were recorded
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        digests = f", {self.digests} digest(s)" if self.digests else ""
        line = (
            f"{self.posts} post(s){digests}: {self.sent} sent, {self.failed} failed, {self.skipped} skipped"
            f", {self.deferred} left for the next run"
        )
        if self.resent:
            line += f", {self.resent} possibly duplicated (sent again after an interrupted run or a lost reply)"
        if self.quota_reached:
            line += "; stopped at [smtp] max_per_day: the next run continues"
        if self.error:
            line += f"; stopped: {self.error}"
        if self.stopped_by is not None:
            line += "; interrupted: what was sent is recorded, run `newsletter send` again to finish"
        return line

    def add_failure(self, text: str) -> None:
        if len(self.failures) < MAX_LISTED_FAILURES:
            self.failures.append(text)


Progress = Callable[[int], None]


def _recover_interrupted(nl: Newsletter, sender_id: int) -> int:
    """Put rows that a dead sender left `sending` back in the queue; returns how many."""
    recovered = 0
    with nl.engine.begin() as conn:
        for table in LEDGERS:
            sending = table.c.status == DeliveryStatus.SENDING
            owners = conn.scalars(select(table.c.claimed_by).where(sending).distinct()).all()
            dead = [o for o in owners if o is None or (o != sender_id and not db.sender_alive(nl.engine, o))]
            if dead:
                stale = or_(table.c.claimed_by.in_([o for o in dead if o is not None]), table.c.claimed_by.is_(None))
                back = update(table).where(sending, stale).values(status=DeliveryStatus.PENDING, claimed_by=None)
                recovered += conn.execute(back).rowcount
    return recovered


def queue_posts(nl: Newsletter) -> list[Post]:
    """Create a delivery per confirmed subscriber the post reaches (categories.readers_of) for every post not
    yet queued: pending for readers on instant email, waiting for the others' next digest. A post in an
    excluded category is marked announced and reaches nobody; a skipped one, or one awaiting approval
    ([site] require_approval), is not queued. Returns the posts queued."""
    status = case(
        (Subscriber.frequency == "instant", literal(DeliveryStatus.PENDING.value)),
        else_=literal(DeliveryStatus.WAITING.value),
    )
    with nl.sessions.begin() as session:
        digests.lock(session.connection())
        due = (
            select(Post)
            .where(
                Post.queued_at.is_(None),
                Post.announced_at.is_(None),
                Post.skipped_at.is_(None),
                or_(~Post.needs_approval, Post.approved_at.is_not(None)),
            )
            .order_by(Post.published_at.is_(None), Post.published_at, Post.id)
        )
        posts = []
        for post in session.scalars(db.locked(due, nl.engine)):
            if categories.excluded(nl.config, post.categories):
                post.announced_at = utcnow()
                continue
            readers = and_(Subscriber.status == Status.CONFIRMED, categories.readers_of(session, post.categories))
            session.execute(
                insert(Delivery).from_select(
                    ["post_id", "subscriber_id", "status"],
                    select(literal(post.id), Subscriber.id, status).where(readers),
                )
            )
            posts.append(post)
            post.queued_at = utcnow()
            post.message_seed = os.urandom(8).hex()
    if posts:
        db.refresh_statistics(nl.engine, DELIVERIES.name)
    return posts


def retry_failed(nl: Newsletter) -> int:
    """Queue again every delivery the server refused for good, and un-bounce its reader; a skipped post's stay
    as they are."""
    with nl.sessions.begin() as session:
        refused = and_(
            Delivery.status == DeliveryStatus.FAILED,
            Delivery.post_id.not_in(select(Post.id).where(Post.skipped_at.is_not(None))),
        )
        failed = select(Delivery.subscriber_id).where(refused)
        session.execute(
            update(Subscriber)
            .where(Subscriber.status == Status.BOUNCED, Subscriber.id.in_(failed))
            .values(status=Status.CONFIRMED)
        )
        posts = select(Delivery.post_id).where(refused).distinct()
        session.execute(update(Post).where(Post.id.in_(posts)).values(announced_at=None))
        requeued = update(Delivery).where(refused)
        result = cast(CursorResult[Any], session.execute(requeued.values(status=DeliveryStatus.PENDING, error=None)))
        return result.rowcount


def _sent_in_last_day(nl: Newsletter) -> int:
    """Notifications, digests and one-off emails sent in the last 24 hours, for [smtp] max_per_day."""
    since = utcnow() - timedelta(days=1)
    with nl.engine.connect() as conn:
        ledgers = sum(
            conn.scalar(
                select(func.count())
                .select_from(table)
                .where(table.c.status == DeliveryStatus.SENT, table.c.updated_at >= since)
            )
            or 0
            for table in LEDGERS
        )
        one_off = conn.scalar(select(func.count()).select_from(OUTBOX).where(OUTBOX.c.sent_at >= since)) or 0
    return ledgers + one_off


def send(
    nl: Newsletter,
    sender_id: int,
    progress: Progress | None = None,
    on_post: Callable[[str, int], None] | None = None,
    now: datetime | None = None,
    stop: threading.Event | None = None,
) -> SendReport:
    """Announce every queued post to its readers on instant email, then send every digest due at NOW
    (default: the time of the call). Call inside a db.sender_lock giving SENDER_ID.

    ON_POST is told the title of each post, or the name of the digests, and how many messages it has.
    STOP set (by a thread other than the caller's) ends the send as a stop signal does.
    """
    report = SendReport(resent=_recover_interrupted(nl, sender_id))
    queue_posts(nl)
    quota = _Quota(nl.config.smtp.max_per_day, _sent_in_last_day(nl) if nl.config.smtp.max_per_day else 0)
    pace = _Pace(nl.config.smtp.max_per_second)
    with nl.sessions() as session:
        posts = list(
            session.scalars(
                select(Post)
                .where(Post.queued_at.is_not(None), Post.announced_at.is_(None))
                .order_by(Post.queued_at, Post.id)
            )
        )
    for post in posts:
        report.posts += 1
        queue = _post_queue(nl, post)
        if on_post:
            on_post(post.title, _count(nl, queue, DeliveryStatus.PENDING))
        _Sender(nl, sender_id, queue, report, progress, quota, pace, stop).run()
        if report.error or report.quota_reached or report.stopped_by:
            return report
        if not _count(nl, queue, DeliveryStatus.PENDING, DeliveryStatus.SENDING):
            with nl.sessions.begin() as session:
                session.execute(update(Post).where(Post.id == post.id).values(announced_at=utcnow()))
    sender = _Sender(nl, sender_id, _digest_queue(nl), report, progress, quota, pace, stop)
    _send_digests(nl, now or utcnow(), sender, on_post)
    return report


def _send_digests(nl: Newsletter, now: datetime, sender: _Sender, on_post: Callable[[str, int], None] | None) -> None:
    """Make the digests due at NOW and send them with SENDER: the first transaction's digests are made
    first, the rest in a thread while the sender sends what is made (it waits for them)."""
    report = sender.report
    due = sum(digests.upcoming(nl, now, 0).readers.values())
    report.digests = _count(nl, sender.queue, DeliveryStatus.PENDING) + due
    assembly = digests.assemble(nl, now)
    next(assembly)
    if not report.digests:  # mark the other readers served; a post queued meanwhile may have made some
        for _ in assembly:
            pass
        report.digests = _count(nl, sender.queue, DeliveryStatus.PENDING)
        if not report.digests:
            return
    if on_post:
        on_post("digests", report.digests)
    failure: list[Exception] = []

    def assemble_rest() -> None:
        try:
            for _ in assembly:
                if sender.stop.is_set() or sender.halt.is_set():
                    return
        except Exception as exc:
            failure.append(exc)

    sender.assembled = threads.start(assemble_rest, "digests")
    sender.run()
    if failure:
        raise failure[0]


def _post_queue(nl: Newsletter, post: Post) -> _Queue:
    seed = post.message_seed

    @functools.cache
    def rendered() -> MessageTemplate:  # not at all when every reader of the post is on digests
        return notification_template(nl.config, nl.render, post)

    def letter(item: _Claimed) -> tuple[Letter, MessageTemplate]:
        template = rendered()
        message_id = f"<{item.row_id}.{seed}@{template.domain}>"
        return Letter("d", item.row_id, item.subscriber_id, item.recipient, message_id, post.id), template

    return _Queue(DELIVERIES, DELIVERIES.c.post_id == post.id, letter)


def _digest_queue(nl: Newsletter) -> _Queue:
    renderer = digests.Renderer(nl)

    def letter(item: _Claimed) -> tuple[Letter, MessageTemplate]:
        template = renderer.template(item.contents)
        message_id = renderer.message_id(item.row_id, item.contents)
        return Letter("g", item.row_id, item.subscriber_id, item.recipient, message_id, item.contents), template

    return _Queue(DIGESTS, true(), letter, DIGESTS.c.contents)


def _count(nl: Newsletter, queue: _Queue, *statuses: DeliveryStatus) -> int:
    with nl.engine.connect() as conn:
        return conn.scalar(select(func.count()).where(queue.scope, queue.table.c.status.in_(statuses))) or 0


class _Pace:
    """Spaces batches so that no more than PER_SECOND messages start each second (0: no limit)."""

    def __init__(self, per_second: int) -> None:
        self.interval = 1.0 / per_second if per_second else 0.0
        self.next = time.monotonic()
        self.lock = threading.Lock()

    def wait(self, messages: int) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + messages * self.interval
        time.sleep(start - now)


class _Quota:
    """What is left of [smtp] max_per_day (0: no limit)."""

    def __init__(self, per_day: int, used: int) -> None:
        self.left = max(per_day - used, 0) if per_day else None

    def take(self, wanted: int) -> int:
        if self.left is None:
            return wanted
        granted = min(wanted, self.left)
        self.left -= granted
        return granted

    def give_back(self, unused: int) -> None:
        if self.left is not None:
            self.left += unused


@dataclass
class _Claimed:
    row_id: int
    subscriber_id: int
    recipient: str
    contents: str = ""


@dataclass
class _Queue:
    """The rows of a ledger (deliveries or digests) that one pass sends, and how each becomes an email."""

    table: Table
    scope: ColumnElement[bool]
    letter: Callable[[_Claimed], tuple[Letter, MessageTemplate]]
    contents: ColumnElement[str] | None = None  # a column the letter needs besides the recipient


class _Sender:
    """Sends a queue's pending rows over [smtp] connections parallel SMTP connections.

    Each thread owns one connection. Recording a finished batch and claiming the next happen in one
    transaction (db.claim: on SQLite the threads take turns at the database, on PostgreSQL they claim
    side by side). `lock` guards the counters they share.
    """

    def __init__(
        self,
        nl: Newsletter,
        sender_id: int,
        queue: _Queue,
        report: SendReport,
        progress: Progress | None,
        quota: _Quota,
        pace: _Pace,
        halt: threading.Event | None = None,
    ) -> None:
        self.nl, self.sender_id, self.queue, self.table = nl, sender_id, queue, queue.table
        self.report, self.progress, self.quota, self.pace = report, progress, quota, pace
        self.lock = threading.Lock()
        self.cursor: int | None = 0
        self.requeued = 0
        self.stop = threading.Event()  # an SMTP error or a stop signal: this pass claims no more
        self.halt = halt or threading.Event()  # the caller's: the whole send stops
        self.assembled = threading.Event()  # clear while rows are still being made for the first pass
        self.assembled.set()
        # Built once and run on the driver's cursor: a batch costs the database less than SQLAlchemy's work.
        engine, table = nl.engine, self.table
        due = (
            select(table.c.id)
            .where(queue.scope, table.c.status == DeliveryStatus.PENDING, table.c.id > bindparam("after"))
            .order_by(table.c.id)
            .limit(bindparam("size"))
        )
        columns = [*RECIPIENT, *([queue.contents] if queue.contents is not None else [])]
        self.claim = db.CompiledClaim(
            engine, table, due, CLAIM_KEYS, [table.c.id, *columns], SUBSCRIBERS.c.id == table.c.subscriber_id
        )
        self.mark_sent = db.DriverStatement(
            engine,
            update(table)
            .where(db.ids_in(table.c.id, "ids", engine))
            .values(status=DeliveryStatus.SENT, updated_at=bindparam("now"), error=None),
        )

    def run(self) -> None:
        """One pass over the pending rows, then bounded retry passes for what came back to the queue.

        Ctrl-C or a stop signal (KeyboardInterrupt in this thread), or the caller's halt, stops the claiming
        of new batches; the batches on the wire are finished and recorded, and report.stopped_by says so.
        """
        for delay in (timedelta(0), *RETRY_PASSES_AFTER):
            started: list[threading.Event] = []
            crew: couriers.Crew | None = None
            try:
                if self.halt.wait(delay.total_seconds()):
                    raise KeyboardInterrupt("stopped")
                self.cursor, self.requeued = 0, 0
                crew = couriers.Crew(self.nl, self.nl.config.smtp.connections, self._forks())
                for number, courier in enumerate(crew.couriers):
                    started.append(threads.start(functools.partial(self._work, courier), f"smtp-{number}"))
                threads.wait(started)
                if self.halt.is_set():
                    raise KeyboardInterrupt("stopped")
            except KeyboardInterrupt as interrupt:  # each connection finishes its batch and records it
                self.stop.set()
                threads.wait(started)
                self.report.stopped_by = interrupt
                break
            finally:
                if crew is not None:
                    crew.close()
            if self.quota.left == 0 and _count(self.nl, self.queue, DeliveryStatus.PENDING):
                self.report.quota_reached = True
            if self.report.error or self.report.quota_reached or not self.requeued:
                break
        threads.wait([self.assembled])
        self.report.deferred += _count(self.nl, self.queue, DeliveryStatus.PENDING, DeliveryStatus.SENDING)

    def _forks(self) -> int:
        """Child processes for this pass: none for less than a batch per connection, where forking would
        cost more than it saves."""
        smtp = self.nl.config.smtp
        forks = couriers.processes(self.nl)
        if forks and _count(self.nl, self.queue, DeliveryStatus.PENDING) < smtp.connections * smtp.batch_size:
            return 0
        return forks

    def _work(self, courier: Courier) -> None:
        done: list[tuple[_Claimed, Result]] = []
        with self.nl.engine.connect() as conn:
            try:
                while True:
                    batch = self._record_and_claim(conn, done)
                    if batch is None:
                        return
                    if not batch:
                        self.assembled.wait(0.05)
                        continue
                    letters: list[Letter] = []
                    templates: dict[Hashable, MessageTemplate] = {}
                    for item in batch:
                        letter, template = self.queue.letter(item)
                        letters.append(letter)
                        templates[letter.template] = template
                    self.pace.wait(len(batch))
                    try:
                        done = list(zip(batch, courier.send(letters, templates), strict=True))
                    except (MailerError, CourierLost) as exc:
                        lost = isinstance(exc, CourierLost)  # the batch may be out: count it as sent again
                        outcome = Outcome.UNKNOWN if lost else Outcome.DEFERRED
                        done = [(item, Result(outcome, None, str(exc))) for item in batch]
                        with self.lock:
                            smtp = self.nl.config.smtp
                            self.report.error = str(exc) if lost else f"SMTP server {smtp.host}:{smtp.port}: {exc}"
                        self.stop.set()
            finally:
                if done:
                    with conn.begin():
                        self._record(conn, done)

    def _record_and_claim(self, conn: Connection, done: list[tuple[_Claimed, Result]]) -> list[_Claimed] | None:
        """Record DONE and claim the next batch; None when this pass is over for the caller's connection, an
        empty batch when none is ready yet (digests still being made)."""
        with conn.begin():
            if done:
                self._record(conn, done)
                done.clear()
            while not (self.stop.is_set() or self.halt.is_set()):
                with self.lock:
                    size = self.quota.take(self.nl.config.smtp.batch_size)
                if not size:
                    return None
                final = self.assembled.is_set()  # before the claim, which then sees every row made
                claimed, unused = self._claim(conn, size, final)
                with self.lock:
                    self.quota.give_back(unused)
                if claimed:
                    return claimed
                if self.cursor is None:
                    return None
                if not final:
                    return []
            return None

    def _claim(self, conn: Connection, size: int, final: bool) -> tuple[list[_Claimed], int]:
        """Mark the next rows `sending`; rows whose reader left meanwhile become `skipped`. Finding none ends
        the pass when FINAL (no more rows will be made during it).

        Returns the rows to send and how many of SIZE were not used for sending.
        """
        after = self.cursor
        if after is None:
            return [], size
        sending = {"status": DeliveryStatus.SENDING, "claimed_by": self.sender_id, "updated_at": utcnow()}
        rows = self.claim.run(conn.connection.cursor(), sending, after=after, size=size)
        with self.lock:
            if not rows:
                if final:
                    self.cursor = None
                return [], size
            if self.cursor is not None:
                self.cursor = max(self.cursor, rows[-1][0])
        live = [row for row in rows if row[3] == Status.CONFIRMED]
        gone = [row[0] for row in rows if row[3] != Status.CONFIRMED]
        if gone:
            table = self.table
            conn.execute(update(table).where(table.c.id.in_(gone)).values(status=DeliveryStatus.SKIPPED))
            with self.lock:
                self.report.skipped += len(gone)
                if self.progress:
                    self.progress(len(gone))
        return [_Claimed(*row[:3], *row[4:]) for row in live], size - len(live)

    def _record(self, conn: Connection, done: list[tuple[_Claimed, Result]]) -> None:
        """Store each outcome: sent, failed (5xx), or back in the queue (4xx, no reply, not sent)."""
        table = self.table
        now = utcnow()
        sent = [item.row_id for item, result in done if result.outcome is Outcome.SENT]
        again = [
            {"d": item.row_id, "e": result.reply[:1024]}
            for item, result in done
            if result.outcome in (Outcome.DEFERRED, Outcome.UNKNOWN)
        ]
        failed = [(item, result) for item, result in done if result.outcome is Outcome.FAILED]
        if sent:
            self.mark_sent.execute(conn.connection.cursor(), ids=db.ids_value(sent, conn), now=now)
        if again:
            conn.execute(
                update(table)
                .where(table.c.id == bindparam("d"))
                .values(status=DeliveryStatus.PENDING, error=bindparam("e"), updated_at=now),
                again,
            )
        for item, result in failed:
            conn.execute(
                update(table)
                .where(table.c.id == item.row_id)
                .values(status=DeliveryStatus.FAILED, error=result.reply[:1024], updated_at=now)
            )
            if result.stage == "rcpt" and not POLICY_REJECTION.match(result.reply):
                conn.execute(
                    update(SUBSCRIBERS)
                    .where(SUBSCRIBERS.c.id == item.subscriber_id, SUBSCRIBERS.c.status == Status.CONFIRMED)
                    .values(status=Status.BOUNCED)
                )
        with self.lock:
            for item, result in failed:
                self.report.add_failure(f"{item.recipient}: {result.reply}")
            self.report.sent += len(sent)
            self.report.failed += len(failed)
            self.report.resent += sum(1 for _, result in done if result.outcome is Outcome.UNKNOWN)
            self.requeued += len(again)
            if self.progress:
                self.progress(len(sent) + len(failed))


def send_copy(nl: Newsletter, post: Post, address: str) -> Result:
    """A copy of POST to one address, outside the ledger (nothing recorded)."""
    return _send_one(nl, notification_template(nl.config, nl.render, post), address)


def send_sample_digest(nl: Newsletter, frequency: str, address: str) -> tuple[Result, list[Post]]:
    """A FREQUENCY digest of the latest posts to one address, outside the ledger; with the posts in it."""
    posts = digests.sample_posts(nl, frequency)
    template = digest_template(nl.config, nl.render, nl.language, frequency, posts)
    return _send_one(nl, template, address), posts


def _send_one(nl: Newsletter, template: MessageTemplate, address: str) -> Result:
    message = template.render(address, template.new_message_id(), nl.unsubscribe_url(0))
    transport = nl.transport()
    try:
        return transport.send([Envelope(template.sender, address, message)])[0]
    finally:
        transport.close()
