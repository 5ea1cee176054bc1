"""The sending engines on the in-memory transport: what dispatch and the outbox record for each outcome,
with no socket and no web app. The real SMTP client is tested in test_mailer.py and end to end elsewhere."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import timedelta
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from sqlalchemy import select

from newsletter import db, dispatch, outbox, posts, roster
from newsletter.mailer import Envelope, MailerError, MemoryTransport, Outcome, Result
from newsletter.models import Delivery, DeliveryStatus, OutboxMessage, Status, Subscriber, utcnow
from newsletter.runtime import Newsletter
from newsletter.subscriptions import Requester, subscribe

READERS = [f"reader{i}@example.com" for i in range(25)]


def refuse(prefix: str, reply: str, stage: str = "rcpt"):
    code = int(reply[:3])
    outcome = Outcome.FAILED if code >= 500 else Outcome.DEFERRED

    def decide(envelope: Envelope) -> Result:
        if envelope.recipient.startswith(prefix):
            return Result(outcome, code, reply, stage)
        return Result(Outcome.SENT, 250, "250 OK", "data")

    return decide


def readers(nl: Newsletter, *addresses: str) -> None:
    for address in addresses:
        roster.add_subscriber(nl, address, confirmed=True)


def send(nl: Newsletter) -> dispatch.SendReport:
    with db.sender_lock(nl.engine) as sender_id:
        return dispatch.send(nl, sender_id)


def delivery_status(nl: Newsletter) -> dict[str, DeliveryStatus]:
    with nl.sessions() as session:
        rows = session.execute(
            select(Subscriber.email_key, Delivery.status).join(Delivery, Delivery.subscriber_id == Subscriber.id)
        )
        return dict(rows.all())


def subscriber_status(nl: Newsletter, address: str) -> Status | None:
    with nl.sessions() as session:
        return session.scalar(select(Subscriber.status).where(Subscriber.email_key == address))


def test_every_reader_gets_the_post_once(nl: Newsletter, memory: MemoryTransport) -> None:
    readers(nl, *READERS)
    posts.add_post(nl, "Ice on the quay", "https://blog.example/ice/", "The quay froze.")
    report = send(nl)
    assert (report.posts, report.sent, report.failed, report.deferred) == (1, 25, 0, 0)
    assert sorted(e.recipient for e in memory.delivered) == sorted(READERS)
    message = message_from_bytes(memory.delivered[0].data, policy=policy.default)
    assert message["Subject"] == "Ice on the quay"
    assert message["List-Unsubscribe"].startswith("<https://news.example.com/unsubscribe/")
    assert memory.closed == nl.config.smtp.connections  # every connection is closed at the end
    assert send(nl).sent == 0


def test_a_refused_reader_is_bounced_and_the_rest_are_sent(nl: Newsletter) -> None:
    memory = MemoryTransport(refuse("gone", "550 5.1.1 no such user"))
    nl.transport_factory = lambda: memory
    readers(nl, "a@example.com", "gone@example.com", "c@example.com")
    posts.add_post(nl, "Gale", "https://blog.example/gale/")
    report = send(nl)
    assert (report.sent, report.failed) == (2, 1)
    assert report.failures == ["gone@example.com: 550 5.1.1 no such user"]
    assert delivery_status(nl)["gone@example.com"] is DeliveryStatus.FAILED
    assert subscriber_status(nl, "gone@example.com") is Status.BOUNCED


def test_a_policy_refusal_of_the_message_bounces_nobody(nl: Newsletter) -> None:
    nl.transport_factory = lambda: MemoryTransport(refuse("b", "550 5.7.26 unauthenticated", stage="data"))
    readers(nl, "a@example.com", "b@example.com")
    posts.add_post(nl, "Gale", "https://blog.example/gale/")
    assert send(nl).failed == 1
    assert subscriber_status(nl, "b@example.com") is Status.CONFIRMED


def test_an_unreachable_server_stops_the_run_and_the_next_run_finishes(nl: Newsletter) -> None:
    def down(envelope: Envelope) -> Result:
        raise MailerError("cannot connect to SMTP server 127.0.0.1:25: Connection refused")

    nl.transport_factory = lambda: MemoryTransport(down)
    readers(nl, *READERS[:5])
    posts.add_post(nl, "Gale", "https://blog.example/gale/")
    report = send(nl)
    assert report.sent == 0 and report.deferred == 5
    assert report.error and "Connection refused" in report.error
    assert set(delivery_status(nl).values()) == {DeliveryStatus.PENDING}

    working = MemoryTransport()
    nl.transport_factory = lambda: working
    assert send(nl).sent == 5
    assert sorted(e.recipient for e in working.delivered) == READERS[:5]


def test_a_send_stopped_from_another_thread_records_its_batches_and_the_next_finishes(nl: Newsletter) -> None:
    stop = threading.Event()

    def accept_then_stop(envelope: Envelope) -> Result:
        stop.set()  # as the web server's main thread does when it stops the worker beside it
        return Result(Outcome.SENT, 250, "250 OK", "data")

    stopping = MemoryTransport(accept_then_stop)
    nl.transport_factory = lambda: stopping
    readers(nl, *READERS)
    posts.add_post(nl, "Squall", "https://blog.example/squall/")
    with db.sender_lock(nl.engine) as sender_id:
        report = dispatch.send(nl, sender_id, stop=stop)
    assert report.stopped_by is not None and 0 < report.sent < len(READERS)
    assert report.sent == len(stopping.delivered) == list(delivery_status(nl).values()).count(DeliveryStatus.SENT)

    rest = MemoryTransport()
    nl.transport_factory = lambda: rest
    assert send(nl).sent == len(READERS) - report.sent
    assert sorted(e.recipient for e in stopping.delivered + rest.delivered) == sorted(READERS)


def test_a_reader_who_left_before_their_batch_is_skipped(nl: Newsletter, memory: MemoryTransport) -> None:
    readers(nl, "a@example.com", "b@example.com")
    posts.add_post(nl, "Gale", "https://blog.example/gale/")
    dispatch.queue_posts(nl)
    with nl.sessions.begin() as session:
        session.scalars(
            select(Subscriber).where(Subscriber.email_key == "b@example.com")
        ).one().status = Status.UNSUBSCRIBED
    report = send(nl)
    assert (report.sent, report.skipped) == (1, 1)
    assert [e.recipient for e in memory.delivered] == ["a@example.com"]


def sign_up(nl: Newsletter, address: str) -> None:
    with nl.sessions.begin() as session:
        subscribe(session, nl, address, Requester(ip="192.0.2.1"))


def outbox_rows(nl: Newsletter) -> list[OutboxMessage]:
    with nl.sessions() as session:
        return list(session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))


def test_the_outbox_sends_a_confirmation_once(nl: Newsletter, memory: MemoryTransport) -> None:
    sign_up(nl, "new@example.com")
    report = outbox.deliver_outbox(nl)
    assert (report.sent, report.deferred, report.failed) == (1, 0, 0)
    [envelope] = memory.delivered
    assert envelope.recipient == "new@example.com"
    assert "Confirm your subscription" in message_from_bytes(envelope.data, policy=policy.default)["Subject"]
    assert outbox.deliver_outbox(nl).sent == 0
    assert memory.closed == 2


def test_the_outbox_tries_a_4xx_again_later_and_fails_a_5xx(nl: Newsletter) -> None:
    nl.transport_factory = lambda: MemoryTransport(
        lambda e: (
            Result(Outcome.DEFERRED, 451, "451 try later", "rcpt")
            if e.recipient.startswith("later")
            else Result(Outcome.FAILED, 550, "550 no such user", "rcpt")
        )
    )
    sign_up(nl, "later@example.com")
    sign_up(nl, "gone@example.com")
    report = outbox.deliver_outbox(nl)
    assert (report.sent, report.deferred, report.failed) == (0, 1, 1)
    later, gone = outbox_rows(nl)
    assert later.attempts == 1 and later.error == "451 try later" and later.sent_at is None
    assert later.next_attempt_at > utcnow() + timedelta(seconds=50)  # the first retry is a minute later
    assert gone.failed_at is not None and gone.error == "550 no such user"
    assert outbox.deliver_outbox(nl).deferred == 0  # nothing is due again yet


def test_an_unreachable_server_leaves_the_outbox_due(nl: Newsletter) -> None:
    def down(envelope: Envelope) -> Result:
        raise MailerError("cannot connect")

    nl.transport_factory = lambda: MemoryTransport(down)
    sign_up(nl, "new@example.com")
    with pytest.raises(MailerError):
        outbox.deliver_outbox(nl)
    [row] = outbox_rows(nl)
    assert row.sent_at is None and row.failed_at is None and row.next_attempt_at <= utcnow()


def test_dkim_signs_whatever_the_transport(config_file: Path, tmp_path: Path) -> None:
    """DKIM wraps the transport: the in-memory one receives signed messages too."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "dkim.pem").write_bytes(pem)
    with config_file.open("a") as file:
        file.write(f'\n[dkim]\nselector = "news"\nprivate_key_file = "{tmp_path / "dkim.pem"}"\n')
    from newsletter.config import load_config

    nl = Newsletter(load_config(config_file))
    try:
        db.upgrade(nl.engine)
        memory = MemoryTransport()
        nl.transport_factory = lambda: memory
        sign_up(nl, "new@example.com")
        outbox.deliver_outbox(nl)
        assert memory.delivered[0].data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    finally:
        nl.engine.dispose()


def test_the_engines_send_without_flask(config_file: Path, nl: Newsletter) -> None:
    """A whole sign-up, confirmation email and notification in a process where Flask cannot be imported."""
    script = f"""
import sys
sys.modules["flask"] = None  # any import of Flask now fails
from newsletter import db, dispatch, outbox, posts, roster
from newsletter.config import load_config
from newsletter.mailer import MemoryTransport
from newsletter.runtime import Newsletter
from newsletter.signups import process_signups
from newsletter.subscriptions import Requester

nl = Newsletter(load_config({str(config_file)!r}))
memory = MemoryTransport()
nl.transport_factory = lambda: memory
from newsletter.ratelimit import SignupLimit
from newsletter.signups import SignupLog
SignupLog(nl.engine, SignupLimit("10 per hour")).add("new@example.com", Requester(ip="192.0.2.1"))
process_signups(nl)
outbox.deliver_outbox(nl)
roster.add_subscriber(nl, "reader@example.com", confirmed=True)
posts.add_post(nl, "Gale", "https://blog.example/gale/")
with db.sender_lock(nl.engine) as sender_id:
    print(dispatch.send(nl, sender_id).summary())
print(sorted(e.recipient for e in memory.delivered))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "1 post(s): 1 sent" in done.stdout
    assert "['new@example.com', 'reader@example.com']" in done.stdout
