"""A reader's whole journey, over real HTTP and a real SMTP server."""

from __future__ import annotations

import re

from sqlalchemy import select

from newsletter.models import Status, Subscriber

from .conftest import publish


def confirm_link(caught) -> str:
    return next(link for link in caught.links() if "/confirm/" in link)


def unsubscribe_link(caught) -> str:
    return next(link for link in caught.links() if "/unsubscribe/" in link)


def subscriber(nl, address: str) -> Subscriber | None:
    with nl.sessions() as session:
        return session.scalar(select(Subscriber).where(Subscriber.email_key == address.lower()))


def test_subscribe_confirm_notify_unsubscribe(site, smtp, run, feed) -> None:
    assert run("posts", "fetch").exit_code == 0

    page = site.get("/")
    assert page.status_code == 200 and 'name="email"' in page.text and '<label for="email"' in page.text

    response = site.subscribe("ada@example.com")
    assert response.status_code == 200 and "Check your inbox" in response.text
    assert smtp.messages == []  # the request only queued the email
    site.deliver_outbox()
    [confirmation] = smtp.to("ada@example.com")
    link = confirm_link(confirmation)
    assert link.startswith("https://news.example.com/confirm/")
    assert link in confirmation.html

    for _ in range(3):  # link scanners: a GET shows the page and confirms nobody
        shown = site.get(link)
        assert shown.status_code == 200 and '<form method="post"' in shown.text
    assert subscriber(site.nl, "ada@example.com").status == Status.UNCONFIRMED

    confirmed = site.press(link)
    assert confirmed.status_code == 200 and "You're subscribed" in confirmed.text
    sub = subscriber(site.nl, "ada@example.com")
    assert sub.status == Status.CONFIRMED and sub.confirmed_ip == "127.0.0.1"
    assert "already subscribed" in site.get(link).text  # opening the link again is harmless and says so

    site.deliver_outbox()
    assert smtp.subjects("ada@example.com") == [
        "Confirm your subscription to Harbour Notes",
        "You're subscribed to Harbour Notes",
    ]

    url = publish(feed, "Ice on the quay", "ice-on-the-quay")
    smtp.clear()
    result = run("send")
    assert result.exit_code == 0, result.output
    assert "1 sent, 0 failed" in result.output
    [note] = smtp.to("ada@example.com")
    message = note.message
    assert message["Subject"] == "Ice on the quay"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert re.fullmatch(r"<https://news\.example\.com/unsubscribe/[^\s<>]+>", message["List-Unsubscribe"])
    assert message["List-Id"] and message["Message-ID"] and message["Date"]
    assert url in note.text and url in note.html
    unsubscribe = unsubscribe_link(note)
    assert message["List-Unsubscribe"] == f"<{unsubscribe}>"
    assert unsubscribe in note.html

    one_click = site.post(unsubscribe, data={"List-Unsubscribe": "One-Click"})
    assert one_click.status_code == 200 and "Location" not in one_click.headers
    sub = subscriber(site.nl, "ada@example.com")
    assert sub.status == Status.UNSUBSCRIBED and sub.unsubscribed_at is not None

    publish(feed, "Spring tides", "spring-tides")
    smtp.clear()
    assert run("send").exit_code == 0
    assert smtp.to("ada@example.com") == []


def test_one_notification_per_confirmed_subscriber(site, smtp, run, feed) -> None:
    run("posts", "fetch")
    for address in ("a@example.com", "b@example.com", "c@example.com"):
        assert run("subscribers", "add", address, "--confirmed").exit_code == 0
    site.subscribe("pending@example.com")
    publish(feed, "Harbour works begin", "works")

    result = run("send")
    assert "3 sent, 0 failed, 0 skipped" in result.output
    recipients = sorted(r for m in smtp.messages for r in m.recipients if "pending" not in r)
    assert recipients == ["a@example.com", "b@example.com", "c@example.com"]
    ids = {m.message["Message-ID"] for m in smtp.messages}
    assert len(ids) == 3
    tokens = {unsubscribe_link(m) for m in smtp.messages}
    assert len(tokens) == 3

    smtp.clear()
    rerun = run("send")
    assert rerun.exit_code == 0 and "0 sent" in rerun.output
    assert smtp.messages == []


def test_confirming_twice_is_harmless_and_says_so(site, smtp) -> None:
    site.subscribe("double@example.com")
    site.deliver_outbox()
    second_click = site.press(confirm_link(smtp.to("double@example.com")[0]), times=2)
    assert second_click.status_code == 200 and "already confirmed" in second_click.text
    site.deliver_outbox()
    assert smtp.subjects("double@example.com").count("You're subscribed to Harbour Notes") == 1


def test_first_fetch_announces_nothing(site, smtp, run) -> None:
    run("subscribers", "add", "a@example.com", "--confirmed")
    result = run("send")
    assert result.exit_code == 0
    assert smtp.messages == []
    listing = run("posts", "list").output
    assert listing.count("announced") == 3


def test_announce_existing_on_first_fetch(site, smtp, run) -> None:
    run("subscribers", "add", "a@example.com", "--confirmed")
    assert run("posts", "fetch", "--announce-existing").exit_code == 0
    run("send", "--no-fetch")
    assert len(smtp.to("a@example.com")) == 3


def test_edited_entry_is_not_announced_again(site, smtp, run, feed) -> None:
    run("posts", "fetch")
    run("subscribers", "add", "a@example.com", "--confirmed")
    feed.write_text(feed.read_text().replace("Market prices: a quiet week", "Market prices: a quiet week (updated)"))
    run("send")
    assert smtp.messages == []


def test_same_page_whatever_the_address_state(site, smtp, run) -> None:
    run("subscribers", "add", "confirmed@example.com", "--confirmed")
    run("subscribers", "add", "left@example.com", "--confirmed")
    site.subscribe("pending@example.com")
    with site.nl.sessions.begin() as session:
        session.scalar(
            select(Subscriber).where(Subscriber.email_key == "left@example.com")
        ).status = Status.UNSUBSCRIBED
    bodies = {
        address: site.subscribe(address)
        for address in ("new@example.com", "pending@example.com", "confirmed@example.com", "left@example.com")
    }
    assert {r.status_code for r in bodies.values()} == {200}
    assert len({r.text for r in bodies.values()}) == 1
    assert subscriber(site.nl, "confirmed@example.com").status == Status.CONFIRMED


def test_one_subscriber_per_address_whatever_the_case(site, smtp) -> None:
    for address in ("Reader@Example.COM", "Reader@example.com", " Reader@EXAMPLE.com "):
        assert site.subscribe(address).status_code == 200
    site.record_signups()
    with site.nl.sessions() as session:
        rows = session.scalars(select(Subscriber)).all()
    assert [(r.email, r.email_key) for r in rows] == [("Reader@example.com", "reader@example.com")]


def test_at_most_one_confirmation_per_ten_minutes(site, smtp) -> None:
    for _ in range(5):
        site.subscribe("eager@example.com")
    site.deliver_outbox()
    assert len(smtp.to("eager@example.com")) == 1


def test_resubscribe_after_unsubscribing_needs_a_new_confirmation(site, smtp, run) -> None:
    site.subscribe("back@example.com")
    site.deliver_outbox()
    first_link = confirm_link(smtp.to("back@example.com")[0])
    site.press(first_link)
    site.deliver_outbox()
    welcome = smtp.to("back@example.com")[-1]
    site.press(unsubscribe_link(welcome))
    assert subscriber(site.nl, "back@example.com").status == Status.UNSUBSCRIBED

    assert "Check your inbox" in site.subscribe("back@example.com").text
    site.record_signups()
    assert subscriber(site.nl, "back@example.com").status == Status.UNSUBSCRIBED  # until a new link is clicked
    assert site.press(first_link).status_code == 400  # the old link died with the old subscription
