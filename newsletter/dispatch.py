"""The sending engine for new-post notifications.

Every (post, subscriber) pair is a row in `deliveries`, created in one INSERT ... SELECT when a post is
queued. Senders claim rows in batches (pending -> sending), hand the batch to one SMTP connection and
record each outcome (sent, failed, or back to pending). A row is marked `sending` only while its batch
is on the wire, so after a crash only that batch can be ambiguous: the next run sends it again with the
same Message-ID and counts it as possibly duplicated. Nothing is ever skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from flask import render_template
from sqlalchemy import and_, bindparam, func, insert, literal, select, text, update

from .app import Newsletter
from .mailer import Envelope, MailerError, Outcome, Result
from .messages import MessageTemplate, notification_template
from .models import Delivery, DeliveryStatus, Post, Status, Subscriber, utcnow
from .outbox import smtp_connection

RETRY_DELAYS = (1.0, 5.0)
POLICY_REJECTION = re.compile(r"^5\d\d[ -]5\.7\.")


class SenderBusy(Exception):
    """Another sender holds the lock on this database."""


@dataclass
class SendReport:
    posts: int = 0
    total: int = 0
    sent: int = 0
    failed: int = 0
    skipped: int = 0
    deferred: int = 0
    uncertain: int = 0
    resent: int = 0
    error: str | None = None
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        line = (f"{self.posts} post(s): {self.sent} sent, {self.failed} failed, {self.skipped} skipped"
                f", {self.deferred + self.uncertain} left for the next run")
        if self.resent:
            line += f", {self.resent} resent after an interrupted run (possibly duplicated)"
        if self.error:
            line += f"; stopped: {self.error}"
        return line


Progress = Callable[[int], None]


@contextlib.contextmanager
def sender_lock(nl: Newsletter) -> Iterator[None]:
    """Only one sender per database; the lock dies with its process, so a crashed run never blocks."""
    url = nl.engine.url
    if url.get_backend_name() == "sqlite":
        path = url.database
        if not path or path == ":memory:":
            yield
            return
        with open(f"{path}.send-lock", "a+b") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SenderBusy("another `newsletter send` is running on this database; "
                                 "wait for it to finish") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    with nl.engine.connect() as conn:
        if not conn.execute(text("SELECT pg_try_advisory_lock(7254001)")).scalar():
            raise SenderBusy("another `newsletter send` is running on this database; wait for it to finish")
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(7254001)"))
            conn.commit()


def queue_posts(nl: Newsletter) -> list[Post]:
    """Create a pending delivery per confirmed subscriber for every post not yet queued."""
    with nl.sessions.begin() as session:
        posts = list(session.scalars(select(Post).where(Post.queued_at.is_(None), Post.announced_at.is_(None))
                                     .order_by(Post.published_at.is_(None), Post.published_at, Post.id)))
        for post in posts:
            session.execute(insert(Delivery).from_select(
                ["post_id", "subscriber_id", "status", "attempts"],
                select(literal(post.id), Subscriber.id, literal(DeliveryStatus.PENDING.value), literal(0))
                .where(Subscriber.status == Status.CONFIRMED)))
            post.queued_at = utcnow()
            post.message_seed = os.urandom(8).hex()
    return posts


def _recover_interrupted(nl: Newsletter) -> int:
    with nl.sessions.begin() as session:
        return session.execute(update(Delivery).where(Delivery.status == DeliveryStatus.SENDING)
                               .values(status=DeliveryStatus.PENDING)).rowcount


def send(nl: Newsletter, progress: Progress | None = None, on_post: Callable[[Post, int], None] | None = None,
         ) -> SendReport:
    """Announce every queued post to its recipients. Call inside an app context, holding sender_lock."""
    report = SendReport(resent=_recover_interrupted(nl))
    queue_posts(nl)
    with nl.sessions() as session:
        posts = list(session.scalars(select(Post).where(Post.queued_at.is_not(None), Post.announced_at.is_(None))
                                     .order_by(Post.queued_at, Post.id)))
    for post in posts:
        report.posts += 1
        template = notification_template(nl.config, render_template, post)
        pending = _count(nl, post, DeliveryStatus.PENDING)
        if on_post:
            on_post(post, pending)
        report.total += pending
        _PostSender(nl, post, template, report, progress).run()
        if report.error:
            break
        with nl.sessions.begin() as session:
            open_rows = session.scalar(select(func.count()).select_from(Delivery).where(
                Delivery.post_id == post.id,
                Delivery.status.in_([DeliveryStatus.PENDING, DeliveryStatus.SENDING])))
            if not open_rows:
                session.execute(update(Post).where(Post.id == post.id).values(announced_at=utcnow()))
    return report


def _count(nl: Newsletter, post: Post, status: DeliveryStatus) -> int:
    with nl.sessions() as session:
        return session.scalar(select(func.count()).select_from(Delivery)
                              .where(Delivery.post_id == post.id, Delivery.status == status)) or 0


@dataclass
class _Claimed:
    delivery_id: int
    subscriber_id: int
    recipient: str


class _PostSender:
    """Sends one post's pending deliveries over [smtp] connections parallel SMTP connections."""

    def __init__(self, nl: Newsletter, post: Post, template: MessageTemplate, report: SendReport,
                 progress: Progress | None) -> None:
        self.nl, self.post, self.template, self.report, self.progress = nl, post, template, report, progress
        self.lock = threading.Lock()
        self.cursor = 0
        self.stop = threading.Event()

    def run(self) -> None:
        """One pass over the pending rows, then bounded retry passes for what the server deferred."""
        delays = (0.0, *RETRY_DELAYS)
        for attempt, delay in enumerate(delays):
            time.sleep(delay)
            before, self.cursor = self.report.deferred, 0
            threads = [threading.Thread(target=self._work, daemon=True)
                       for _ in range(self.nl.config.smtp.connections)]
            for thread in threads:
                thread.start()
            try:
                for thread in threads:
                    thread.join()
            except KeyboardInterrupt:
                self.stop.set()
                for thread in threads:
                    thread.join()
                raise
            if self.report.error or self.report.deferred == before or attempt == len(delays) - 1:
                return
            self.report.deferred = before

    def _work(self) -> None:
        connection = smtp_connection(self.nl.config.smtp)
        try:
            while not self.stop.is_set():
                with self.lock:
                    batch = self._claim()
                if not batch:
                    return
                try:
                    results = connection.send([self._envelope(item) for item in batch])
                except MailerError as exc:
                    self._release(batch)
                    with self.lock:
                        self.report.error = f"SMTP server {self.nl.config.smtp.host}:{self.nl.config.smtp.port}: {exc}"
                    self.stop.set()
                    return
                self._record(batch, results)
        finally:
            connection.close()

    def _envelope(self, item: _Claimed) -> Envelope:
        message = self.template.render(
            item.recipient, f"<{item.delivery_id}.{self.post.message_seed}@{self.template.domain}>",
            self.nl.unsubscribe_url(item.subscriber_id))
        return Envelope(self.template.sender, item.recipient, message)

    def _claim(self) -> list[_Claimed]:
        """Mark the next batch `sending`; rows whose subscriber left meanwhile become `skipped`."""
        while True:
            rows, gone = self._claim_rows()
            if gone and self.progress:
                self.progress(gone)
            if rows or not gone:
                return rows

    def _claim_rows(self) -> tuple[list[_Claimed], int]:
        size = self.nl.config.smtp.batch_size
        now = utcnow()
        with self.nl.sessions.begin() as session:
            ids = (select(Delivery.id)
                   .where(Delivery.post_id == self.post.id, Delivery.status == DeliveryStatus.PENDING,
                          Delivery.id > self.cursor)
                   .order_by(Delivery.id).limit(size))
            if session.bind.dialect.name == "postgresql":
                ids = ids.with_for_update(skip_locked=True)
            rows = session.execute(
                select(Delivery.id, Subscriber.id, Subscriber.email_ascii, Subscriber.status)
                .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
                .where(Delivery.id.in_(ids.scalar_subquery()))
                .order_by(Delivery.id)).all()
            if not rows:
                return [], 0
            self.cursor = rows[-1][0]
            live = [row for row in rows if row[3] == Status.CONFIRMED]
            gone = [row[0] for row in rows if row[3] != Status.CONFIRMED]
            if gone:
                session.execute(update(Delivery).where(Delivery.id.in_(gone))
                                .values(status=DeliveryStatus.SKIPPED, updated_at=now))
                self.report.skipped += len(gone)
            if live:
                session.execute(update(Delivery).where(Delivery.id.in_([row[0] for row in live]))
                                .values(status=DeliveryStatus.SENDING, attempts=Delivery.attempts + 1,
                                        updated_at=now))
        return [_Claimed(row[0], row[1], row[2]) for row in live], len(gone)

    def _release(self, batch: list[_Claimed]) -> None:
        with self.nl.sessions.begin() as session:
            session.execute(update(Delivery).where(Delivery.id.in_([item.delivery_id for item in batch]))
                            .values(status=DeliveryStatus.PENDING, attempts=Delivery.attempts - 1))

    def _record(self, batch: list[_Claimed], results: list[Result]) -> None:
        now = utcnow()
        sent = [item.delivery_id for item, result in zip(batch, results) if result.outcome is Outcome.SENT]
        deferred = [{"d": item.delivery_id, "e": result.reply[:1024]}
                    for item, result in zip(batch, results) if result.outcome is Outcome.DEFERRED]
        failed = [(item, result) for item, result in zip(batch, results) if result.outcome is Outcome.FAILED]
        uncertain = sum(1 for result in results if result.outcome is Outcome.UNKNOWN)
        with self.nl.sessions.begin() as session:
            if sent:
                session.execute(update(Delivery).where(Delivery.id.in_(sent))
                                .values(status=DeliveryStatus.SENT, updated_at=now, error=None))
            if deferred:
                session.connection().execute(
                    update(Delivery.__table__).where(Delivery.__table__.c.id == bindparam("d"))
                    .values(status=DeliveryStatus.PENDING.value, error=bindparam("e"), updated_at=now), deferred)
            for item, result in failed:
                session.execute(update(Delivery).where(Delivery.id == item.delivery_id)
                                .values(status=DeliveryStatus.FAILED, error=result.reply[:1024], updated_at=now))
                if result.stage == "rcpt" and not POLICY_REJECTION.match(result.reply):
                    session.execute(update(Subscriber).where(and_(Subscriber.id == item.subscriber_id,
                                                                  Subscriber.status == Status.CONFIRMED))
                                    .values(status=Status.BOUNCED))
        with self.lock:
            self.report.sent += len(sent)
            self.report.deferred += len(deferred)
            self.report.failed += len(failed)
            self.report.uncertain += uncertain
            self.report.failures += [f"{item.recipient}: {result.reply}" for item, result in failed]
            if self.progress:
                self.progress(len(sent) + len(failed))


def send_copy(nl: Newsletter, post: Post, address: str) -> Result:
    """A copy of POST to one address, outside the ledger (nothing recorded)."""
    template = notification_template(nl.config, render_template, post)
    message = template.render(address, template.new_message_id(), nl.unsubscribe_url(0))
    connection = smtp_connection(nl.config.smtp)
    try:
        return connection.send([Envelope(template.sender, address, message)])[0]
    finally:
        connection.close()
