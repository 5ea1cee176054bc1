"""Deliver the one-off emails (confirmation, welcome) waiting in the outbox table.

A batch is claimed with a lease (next_attempt_at moves 5 minutes ahead), so a worker that dies mid-batch
leaves its rows to be taken again once the lease ends; several workers may run at once. A refusal (5xx)
fails the email; a temporary failure (4xx, dropped connection) tries again later on a growing schedule,
for up to two days.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Row, select, update

from . import db, threads
from .mailer import Envelope, MailerError, Outcome, Result
from .models import OUTBOX, utcnow
from .runtime import Newsletter

LEASE = timedelta(minutes=5)
RETRY_SCHEDULE = [timedelta(minutes=m) for m in (1, 5, 15, 30, 60, 120, 240)]
GIVE_UP_AFTER = timedelta(days=2)
BATCH = 50
COLUMNS = (OUTBOX.c.id, OUTBOX.c.sender, OUTBOX.c.recipient, OUTBOX.c.message, OUTBOX.c.created_at, OUTBOX.c.attempts)


@dataclass
class OutboxReport:
    sent: int = 0
    deferred: int = 0
    failed: int = 0


def deliver_outbox(nl: Newsletter, stop: threading.Event | None = None) -> OutboxReport:
    """Send every outbox message that is due; raises MailerError when the SMTP server cannot be used.

    Ctrl-C or a stop signal (KeyboardInterrupt here), or STOP being set, ends it once the batch on the wire
    is sent and recorded: its readers are neither left waiting for the lease to end nor mailed twice.
    """
    report = OutboxReport()
    halt = stop or threading.Event()
    failure: list[Exception] = []

    def work() -> None:
        transport = nl.transport()
        try:
            while not halt.is_set() and (batch := _claim(nl)):
                try:
                    results = transport.send([Envelope(_sender(nl, m), m.recipient, m.message) for m in batch])
                except MailerError:
                    _release(nl, [m.id for m in batch])
                    raise
                _record(nl, batch, results, report)
        except Exception as exc:
            failure.append(exc)
        finally:
            transport.close()

    finished = threads.start(work, "outbox")
    try:
        threads.wait([finished])
    except KeyboardInterrupt:
        halt.set()
        threads.wait([finished])
        raise
    if failure:
        raise failure[0]
    return report


def _sender(nl: Newsletter, message: Row[*tuple[Any, ...]]) -> str:
    """The envelope sender: a bounce address naming the message with [bounces] address, else the one stored."""
    return nl.return_path("o", message.id) if nl.config.bounces.address else message.sender


def _claim(nl: Newsletter) -> list[Row[*tuple[Any, ...]]]:
    now = utcnow()
    due = (
        select(OUTBOX.c.id)
        .where(
            OUTBOX.c.sent_at.is_(None),
            OUTBOX.c.failed_at.is_(None),
            OUTBOX.c.held.is_(False),
            OUTBOX.c.next_attempt_at <= now,
        )
        .order_by(OUTBOX.c.id)
        .limit(BATCH)
    )
    with nl.engine.begin() as conn:
        return db.claim(conn, OUTBOX, due, {"next_attempt_at": now + LEASE}, COLUMNS)


def _release(nl: Newsletter, ids: list[int]) -> None:
    with nl.engine.begin() as conn:
        conn.execute(update(OUTBOX).where(OUTBOX.c.id.in_(ids)).values(next_attempt_at=utcnow()))


def _record(
    nl: Newsletter, batch: list[Row[*tuple[Any, ...]]], results: Sequence[Result], report: OutboxReport
) -> None:
    now = utcnow()
    with nl.engine.begin() as conn:
        for message, result in zip(batch, results, strict=True):
            values: dict[str, object]
            if result.outcome is Outcome.SENT:
                values, report.sent = {"sent_at": now, "error": None}, report.sent + 1
            elif result.outcome is Outcome.FAILED or now - message.created_at > GIVE_UP_AFTER:
                values, report.failed = {"failed_at": now, "error": result.reply[:1024]}, report.failed + 1
            else:
                delay = RETRY_SCHEDULE[min(message.attempts, len(RETRY_SCHEDULE) - 1)]
                values = {
                    "next_attempt_at": now + delay,
                    "error": result.reply[:1024],
                    "attempts": message.attempts + 1,
                }
                report.deferred += 1
            conn.execute(update(OUTBOX).where(OUTBOX.c.id == message.id).values(**values))
