"""Deliver the one-off emails (confirmation, welcome) waiting in the outbox table."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update

from .app import Newsletter
from .config import SMTPConfig
from .mailer import Envelope, MailerError, Outcome, SMTPConnection
from .models import OutboxMessage, utcnow
from .signing import load_signer
from .subscriptions import signups_in_last_hour

LEASE = timedelta(minutes=5)
RETRY_DELAYS = [timedelta(minutes=m) for m in (1, 5, 15, 30, 60, 120, 240)]
GIVE_UP_AFTER = timedelta(days=2)
BATCH = 50


def smtp_connection(smtp: SMTPConfig) -> SMTPConnection:
    return SMTPConnection(smtp.host, smtp.port, security=smtp.security, username=smtp.username,
                          password=smtp.password, timeout=float(smtp.timeout))


@dataclass
class OutboxReport:
    sent: int = 0
    deferred: int = 0
    failed: int = 0


def deliver_outbox(nl: Newsletter) -> OutboxReport:
    """Send every outbox message that is due; raises MailerError when the SMTP server cannot be used."""
    report = OutboxReport()
    sign = load_signer(nl.config)
    release_held(nl)
    connection = smtp_connection(nl.config.smtp)
    try:
        while batch := _claim(nl):
            try:
                results = connection.send([Envelope(m.sender, m.recipient, sign(m.message) if sign else m.message)
                                           for m in batch])
            except MailerError:
                _release(nl, [m.id for m in batch])
                raise
            _record(nl, batch, results, report)
    finally:
        connection.close()
    return report


def release_held(nl: Newsletter) -> int:
    """Let held confirmation emails go once sign-ups are back under [web] signup_ceiling an hour."""
    with nl.sessions.begin() as session:
        if signups_in_last_hour(session) > nl.config.web.signup_ceiling:
            return 0
        return session.execute(update(OutboxMessage).where(OutboxMessage.held.is_(True))
                               .values(held=False)).rowcount


def _claim(nl: Newsletter) -> list[OutboxMessage]:
    now = utcnow()
    with nl.sessions.begin() as session:
        due = (select(OutboxMessage.id)
               .where(OutboxMessage.sent_at.is_(None), OutboxMessage.failed_at.is_(None),
                      OutboxMessage.held.is_(False), OutboxMessage.next_attempt_at <= now)
               .order_by(OutboxMessage.id).limit(BATCH))
        if session.bind.dialect.name == "postgresql":
            due = due.with_for_update(skip_locked=True)
        ids = list(session.scalars(due))
        if not ids:
            return []
        session.execute(update(OutboxMessage).where(OutboxMessage.id.in_(ids))
                        .values(next_attempt_at=now + LEASE, attempts=OutboxMessage.attempts + 1))
        return list(session.scalars(select(OutboxMessage).where(OutboxMessage.id.in_(ids))
                                    .order_by(OutboxMessage.id)))


def _release(nl: Newsletter, ids: list[int]) -> None:
    with nl.sessions.begin() as session:
        session.execute(update(OutboxMessage).where(OutboxMessage.id.in_(ids))
                        .values(next_attempt_at=utcnow(), attempts=OutboxMessage.attempts - 1))


def _record(nl: Newsletter, batch: list[OutboxMessage], results: list, report: OutboxReport) -> None:
    now = utcnow()
    with nl.sessions.begin() as session:
        for message, result in zip(batch, results):
            values: dict[str, object]
            if result.outcome is Outcome.SENT:
                values, report.sent = {"sent_at": now, "error": None}, report.sent + 1
            elif result.outcome is Outcome.FAILED or now - message.created_at > GIVE_UP_AFTER:
                values, report.failed = {"failed_at": now, "error": result.reply[:1024]}, report.failed + 1
            else:
                delay = RETRY_DELAYS[min(message.attempts, len(RETRY_DELAYS)) - 1]
                values = {"next_attempt_at": now + delay, "error": result.reply[:1024]}
                report.deferred += 1
            session.execute(update(OutboxMessage).where(OutboxMessage.id == message.id).values(**values))
