"""A reader's choice is law: nothing the owner, an import or a second sign-up does re-subscribes someone
who left, and sign-ups never confirmed are forgotten."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from newsletter.models import OUTBOX, Confirmation, OutboxMessage, Signup, Status, Subscriber

from .conftest import publish
from .test_links import confirmed, signed_up
from .test_reader_flow import subscriber


@pytest.fixture
def extra_config() -> str:
    return "\n[web]\nunconfirmed_days = 3\n"


def left(site, smtp, address: str) -> Subscriber:
    """A reader who confirmed and then unsubscribed with their mail client's one-click button."""
    unsubscribe = confirmed(site, smtp, address)
    assert site.post(unsubscribe, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    gone = subscriber(site.nl, address)
    assert gone is not None and gone.status is Status.UNSUBSCRIBED
    return gone


def bounced(run, smtp, feed: Path, address: str) -> None:
    """A confirmed reader whose server refused a notification for good."""
    smtp.reply = lambda rcpt: "550 5.1.1 no such user" if rcpt == address else None
    run("posts", "fetch")
    run("subscribers", "add", address, "--confirmed")
    publish(feed, "Gale on Sunday", "gale")
    assert "1 failed" in run("send").output
    smtp.reply = lambda rcpt: None


def test_an_import_leaves_readers_who_left_as_they_are(site, smtp, run, feed, tmp_path: Path) -> None:
    left(site, smtp, "gone@example.com")
    bounced(run, smtp, feed, "dead@example.com")
    csv = tmp_path / "readers.csv"
    csv.write_text("email,status\ngone@example.com,confirmed\nDEAD@example.com,confirmed\nnew@example.com,\n")
    result = run("subscribers", "import", str(csv))
    assert result.output.splitlines()[0] == "imported 1; already there 2; refused 0 (run with --verbose to list them)"
    assert subscriber(site.nl, "gone@example.com").status is Status.UNSUBSCRIBED
    assert subscriber(site.nl, "dead@example.com").status is Status.BOUNCED

    publish(feed, "Calm again", "calm")
    smtp.clear()
    run("send")
    assert [m.recipients for m in smtp.messages] == [["new@example.com"]]


@pytest.mark.parametrize("goodbye", ["unsubscribed", "bounced"])
def test_the_owner_cannot_confirm_a_reader_who_left_without_force(site, smtp, run, feed, goodbye: str) -> None:
    if goodbye == "unsubscribed":
        left(site, smtp, "gone@example.com")
    else:
        bounced(run, smtp, feed, "gone@example.com")
    before = subscriber(site.nl, "gone@example.com")
    refused = run("subscribers", "add", "gone@example.com", "--confirmed")
    assert refused.exit_code == 1
    assert refused.output.strip() == (
        f"Error: gone@example.com is {goodbye}: they left the list, so it is not confirmed again; "
        "add --force only if they asked you to add them back"
    )
    assert f"already there: gone@example.com ({goodbye})" in run("subscribers", "add", "gone@example.com").output
    assert subscriber(site.nl, "gone@example.com").status is Status(goodbye)
    assert "--force" in run("subscribers", "add", "--help").output

    forced = run("subscribers", "add", "gone@example.com", "--confirmed", "--force")
    assert forced.output.strip() == "already there: gone@example.com (confirmed)"
    after = subscriber(site.nl, "gone@example.com")
    assert after.confirmed_at > before.confirmed_at
    assert after.confirmed_user_agent == "newsletter command line --force"
    assert after.unsubscribed_at == before.unsubscribed_at  # the record keeps that they had left


def test_signing_up_again_does_not_resubscribe_until_the_new_link_is_clicked(site, smtp, run, feed) -> None:
    before = left(site, smtp, "back@example.com")
    with site.nl.sessions.begin() as session:  # the ten-minute spacing of confirmation emails has passed
        for confirmation in session.scalars(select(Confirmation)):
            confirmation.sent_at -= timedelta(minutes=11)
    link = signed_up(site, smtp, "back@example.com")
    waiting = subscriber(site.nl, "back@example.com")
    assert waiting.status is Status.UNSUBSCRIBED
    assert (waiting.subscribed_at, waiting.subscribed_ip, waiting.unsubscribed_at) == (
        before.subscribed_at,
        before.subscribed_ip,
        before.unsubscribed_at,
    )
    run("posts", "fetch")
    publish(feed, "Gale on Sunday", "gale")
    smtp.clear()
    assert "0 post(s)" not in run("send").output
    assert smtp.to("back@example.com") == []

    assert site.press(link).status_code == 200
    back = subscriber(site.nl, "back@example.com")
    assert back.status is Status.CONFIRMED
    assert back.subscribed_at == waiting.pending_at and back.unsubscribed_at is None and back.pending_at is None


def age(nl, days: float, address: str) -> None:
    """Move ADDRESS's sign-up (for a reader already on the list, their sign-up again) and its emails DAYS
    into the past."""
    with nl.sessions.begin() as session:
        reader = session.scalars(select(Subscriber).where(Subscriber.email_key == address)).one()
        if reader.pending_at is not None:
            reader.pending_at -= timedelta(days=days)
        else:
            reader.created_at -= timedelta(days=days)
            reader.subscribed_at -= timedelta(days=days)
        for message in session.scalars(select(OutboxMessage).where(OutboxMessage.subscriber_id == reader.id)):
            message.created_at -= timedelta(days=days)


def test_unconfirmed_signups_are_forgotten_after_the_configured_days(site, smtp, run) -> None:
    smtp.reply = lambda rcpt: "451 4.3.0 try again later" if rcpt.startswith("slow") else None
    for address in ("old@example.com", "slow@example.com", "recent@example.com"):
        site.subscribe(address)
    site.deliver_outbox()
    assert "sign-ups waiting for confirmation: 3 (forgotten after 3 days)" in run("stats").output
    age(site.nl, 4, "old@example.com")
    age(site.nl, 4, "slow@example.com")
    age(site.nl, 2, "recent@example.com")

    assert run("worker", "--once").exit_code == 0
    assert subscriber(site.nl, "old@example.com") is None and subscriber(site.nl, "slow@example.com") is None
    assert subscriber(site.nl, "recent@example.com").subscribed_ip == "127.0.0.1"
    with site.nl.engine.connect() as conn:
        recipients = conn.scalars(select(OUTBOX.c.recipient)).all()
    assert sorted(recipients) == ["recent@example.com"]  # the never-delivered email went with its reader
    assert "sign-ups waiting for confirmation: 1 (forgotten after 3 days)" in run("stats").output


@pytest.mark.parametrize("extra_config", ["\n[web]\nunconfirmed_days = 3\nnetwork_ceiling = 1\n"])
def test_confirmations_held_in_a_flood_are_forgotten_with_their_sign_ups(site, smtp, run) -> None:
    """The sign-up again of a reader who left is forgotten too, and they stay unsubscribed."""
    left(site, smtp, "back@example.com")
    with site.nl.sessions.begin() as session:  # the ten-minute spacing of confirmation emails has passed
        for confirmation in session.scalars(select(Confirmation)):
            confirmation.sent_at -= timedelta(minutes=11)
    site.subscribe("back@example.com")  # the network's second sign-up this hour: over its ceiling of one
    site.subscribe("new@example.com")
    smtp.clear()
    site.deliver_outbox()
    assert smtp.messages == []
    stats = run("stats").output.splitlines()
    assert {"sign-ups waiting for confirmation: 2 (forgotten after 3 days)", "outbox: 0 queued, 2 held"} <= set(stats)
    assert subscriber(site.nl, "back@example.com").pending_ip == "127.0.0.1"

    age(site.nl, 4, "back@example.com")
    age(site.nl, 4, "new@example.com")
    with site.nl.sessions.begin() as session:  # the flood is long over
        for signup in session.scalars(select(Signup)):
            signup.received_at -= 4 * 86400
    assert run("worker", "--once").exit_code == 0
    assert smtp.messages == []
    back = subscriber(site.nl, "back@example.com")
    assert back.status is Status.UNSUBSCRIBED
    assert (back.pending_at, back.pending_ip, back.pending_user_agent) == (None, None, None)
    assert subscriber(site.nl, "new@example.com") is None
    stats = run("stats").output.splitlines()
    assert {"sign-ups waiting for confirmation: 0 (forgotten after 3 days)", "outbox: 0 queued, 0 held"} <= set(stats)
