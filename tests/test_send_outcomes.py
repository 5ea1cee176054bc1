"""What `newsletter send` does with refusals, unsubscribes mid-run, and a second sender."""

from __future__ import annotations

import collections
import re
import subprocess

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select

from newsletter.models import Delivery, DeliveryStatus, Status, Subscriber

from .conftest import SMTPSink, publish, wait_for
from .test_interrupted_send import Slow


def status_of(nl, address: str) -> Status:
    with nl.sessions() as session:
        return session.scalar(select(Subscriber.status).where(Subscriber.email_key == address))


def deliveries(nl) -> dict[str, DeliveryStatus]:
    with nl.sessions() as session:
        rows = session.execute(
            select(Subscriber.email_key, Delivery.status).join(Delivery, Delivery.subscriber_id == Subscriber.id)
        )
        return dict(rows.all())


def setup_readers(run, feed, *addresses: str) -> None:
    run("posts", "fetch")
    for address in addresses:
        run("subscribers", "add", address, "--confirmed")
    publish(feed, "Gale on Sunday", "gale")


def test_permanent_refusal_bounces_only_that_subscriber(run, nl, smtp, feed) -> None:
    smtp.reply = lambda rcpt: "550 5.1.1 No such user" if rcpt.startswith("gone") else None
    setup_readers(run, feed, "a@example.com", "gone@example.com", "c@example.com")
    result = run("send")
    assert result.exit_code == 0
    assert "2 sent, 1 failed" in result.output
    assert "gone@example.com: 550 5.1.1 No such user" in result.output
    assert status_of(nl, "gone@example.com") == Status.BOUNCED
    assert deliveries(nl)["gone@example.com"] == DeliveryStatus.FAILED

    publish(feed, "Calm again", "calm")
    smtp.clear()
    run("send")
    assert sorted(r for m in smtp.messages for r in m.recipients) == ["a@example.com", "c@example.com"]


def test_policy_refusal_does_not_bounce_the_reader(run, nl, smtp, feed) -> None:
    smtp.reply = lambda rcpt: "550 5.7.26 Unauthenticated email is not accepted" if rcpt.startswith("b") else None
    setup_readers(run, feed, "a@example.com", "b@example.com")
    assert "1 failed" in run("send").output
    assert status_of(nl, "b@example.com") == Status.CONFIRMED


def test_temporary_refusal_is_left_for_the_next_run(run, nl, smtp, feed) -> None:
    smtp.reply = lambda rcpt: "451 4.7.1 Try again later" if rcpt.startswith("busy") else None
    setup_readers(run, feed, "a@example.com", "busy@example.com")
    first = run("send")
    assert first.exit_code == 0 and "1 sent" in first.output and "1 left for the next run" in first.output
    assert deliveries(nl)["busy@example.com"] == DeliveryStatus.PENDING
    assert "sending" in run("posts", "list").output

    smtp.reply = lambda rcpt: None
    second = run("send")
    assert "1 sent" in second.output
    assert sorted(r for m in smtp.messages for r in m.recipients) == ["a@example.com", "busy@example.com"]
    assert "sending" not in run("posts", "list").output


class UnsubscribesLastReader(SMTPSink):
    """On the first message, the last reader in the list clicks unsubscribe."""

    def __init__(self, site) -> None:
        super().__init__()
        self.site, self.link = site, None

    async def handle_DATA(self, server, session, envelope):
        if not self.messages and self.link:
            import asyncio

            await asyncio.to_thread(self.site.post, self.link, data={"List-Unsubscribe": "One-Click"})
        return await super().handle_DATA(server, session, envelope)


def test_unsubscribe_during_a_send_is_honoured(run, nl, site, feed, smtp_port) -> None:
    readers = [f"r{i:02d}@example.com" for i in range(60)]
    setup_readers(run, feed, *readers)
    with nl.sessions() as session:
        last = session.scalar(select(Subscriber).where(Subscriber.email_key == readers[-1]))
    sink = UnsubscribesLastReader(site)
    sink.link = nl.unsubscribe_url(last.id)
    controller = Controller(sink, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    try:
        result = run("send")
    finally:
        controller.stop()
    received = {r for m in sink.messages for r in m.recipients}
    assert readers[-1] not in received
    assert received == set(readers[:-1])
    assert "59 sent, 0 failed, 1 skipped" in result.output


def test_a_second_sender_waits_its_turn_or_shares_the_work(run, nl, config_file, feed, smtp_port) -> None:
    """SQLite refuses a second concurrent sender; PostgreSQL lets it help. Either way: one copy each."""
    readers = [f"r{i:03d}@example.com" for i in range(600)]  # a run of seconds, so the second one overlaps it
    csv = config_file.parent / "readers.csv"
    csv.write_text("email\n" + "\n".join(readers) + "\n")
    run("subscribers", "import", str(csv))
    run("posts", "fetch")
    publish(feed, "Gale on Sunday", "gale")
    sink = Slow()
    controller = Controller(sink, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    try:
        first = subprocess.Popen(
            ["newsletter", "--config", str(config_file), "send"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for(lambda: len(sink.messages) >= 5, timeout=20)
        second = subprocess.run(
            ["newsletter", "--config", str(config_file), "send"], capture_output=True, text=True, timeout=60
        )
        first.communicate(timeout=60)
    finally:
        controller.stop()
    assert first.returncode == 0
    if nl.engine.dialect.name == "sqlite":
        assert second.returncode == 1
        assert second.stderr.strip() == (
            "Error: another `newsletter send` is running on this database; wait for it to finish"
        )
    else:
        assert second.returncode == 0, second.stderr
    assert sorted(r for m in sink.messages for r in m.recipients) == readers


def test_three_senders_at_once_share_the_work_on_postgresql(run, nl, config_file, feed, smtp_port) -> None:
    if nl.engine.dialect.name != "postgresql":
        pytest.skip("several concurrent senders need PostgreSQL (SQLite allows one; see the test above)")
    readers = [f"r{i:04d}@example.com" for i in range(1500)]
    csv = config_file.parent / "readers.csv"
    csv.write_text("email\n" + "\n".join(readers) + "\n")
    run("subscribers", "import", str(csv))
    run("posts", "fetch")
    publish(feed, "Three hands make light work", "three")
    assert run("posts", "fetch").exit_code == 0
    sink = Slow()
    controller = Controller(sink, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    try:
        senders = [
            subprocess.Popen(
                ["newsletter", "--config", str(config_file), "send", "--no-fetch"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(3)
        ]
        outputs = [sender.communicate(timeout=120)[0] for sender in senders]
    finally:
        controller.stop()
    assert [sender.returncode for sender in senders] == [0, 0, 0], outputs
    received = collections.Counter(r for m in sink.messages for r in m.recipients)
    assert received == collections.Counter(readers)
    sent_by_each = [int(re.search(r"(\d+) sent", output).group(1)) for output in outputs]
    assert sum(sent_by_each) == 1500
    assert sum(1 for n in sent_by_each if n) >= 2, sent_by_each
