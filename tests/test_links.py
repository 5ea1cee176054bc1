"""Confirmation and unsubscribe links, bad addresses, and SMTP being down while readers sign up."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import requests
from aiosmtpd.controller import Controller
from itsdangerous import TimestampSigner, URLSafeSerializer, URLSafeTimedSerializer
from sqlalchemy import func, select

from newsletter.mailer import MailerError
from newsletter.models import Confirmation, OutboxMessage, Status, Subscriber
from newsletter.tokens import CONFIRM_SALT, MANAGE_SALT, UNSUBSCRIBE_SALT, Tokens

from .conftest import SMTPSink
from .test_reader_flow import confirm_link, subscriber, unsubscribe_link


def signed_up(site, smtp, address: str = "reader@example.com") -> str:
    """Subscribe ADDRESS and return the confirmation link from the email."""
    site.subscribe(address)
    site.deliver_outbox()
    return confirm_link(smtp.to(address)[-1])


def confirmed(site, smtp, address: str = "reader@example.com") -> str:
    """A confirmed subscriber; returns the unsubscribe link from their welcome email."""
    site.press(signed_up(site, smtp, address))
    site.deliver_outbox()
    return unsubscribe_link(smtp.to(address)[-1])


def token_of(link: str) -> str:
    return link.rsplit("/", 1)[1]


def _flip_signature(token: str) -> str:
    """TOKEN with the first character of its signature changed (the last one can carry unused bits)."""
    head, signature = token.rsplit(".", 1)
    return f"{head}.{'B' if signature[0] == 'A' else 'A'}{signature[1:]}"


def count(nl, model) -> int:
    with nl.sessions() as session:
        return session.scalar(select(func.count()).select_from(model))


def test_expired_confirmation_link(site, smtp) -> None:
    link = signed_up(site, smtp)
    claim = site.nl.tokens.read_confirm_token(token_of(link))

    class FiftyHoursAgo(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - 50 * 3600

    old = URLSafeTimedSerializer([site.nl.config.security.secret_key], salt=CONFIRM_SALT, signer=FiftyHoursAgo)
    expired = link.replace(token_of(link), old.dumps([claim.subscriber_id, claim.nonce]))
    response = site.get(expired)
    assert response.status_code == 400
    assert "expired" in response.text and 'href="/"' in response.text
    assert site.press(expired).status_code == 400
    assert subscriber(site.nl, "reader@example.com").status == Status.UNCONFIRMED


@pytest.mark.parametrize("damage", ["one-char", "cut-short", "other-purpose", "garbage"])
def test_tampered_confirmation_link(site, smtp, damage: str) -> None:
    link = signed_up(site, smtp)
    token = token_of(link)
    bad = {
        "one-char": _flip_signature(token),
        "cut-short": token[: len(token) // 2],
        "other-purpose": site.nl.tokens.unsubscribe_token(1),
        "garbage": "not-a-token",
    }[damage]
    response = site.get(f"/confirm/{bad}")
    assert response.status_code == 400 and "Subscribe again" in response.text
    assert site.press(f"{site.base}/confirm/{bad}").status_code == 400
    assert subscriber(site.nl, "reader@example.com").status == Status.UNCONFIRMED


def test_a_newer_confirmation_email_replaces_the_older_link(site, smtp, nl) -> None:
    first = signed_up(site, smtp)
    with nl.sessions.begin() as session:  # the ten-minute spacing has passed
        for confirmation in session.scalars(select(Confirmation)):
            confirmation.sent_at -= timedelta(minutes=11)
    second = signed_up(site, smtp)
    assert second != first
    assert site.press(first).status_code == 400
    assert site.press(second).status_code == 200
    assert subscriber(nl, "reader@example.com").status == Status.CONFIRMED


def test_get_and_head_never_change_anything(site, smtp) -> None:
    confirm = signed_up(site, smtp, "scanned@example.com")
    for _ in range(5):
        assert site.get(confirm).status_code == 200
        requests.head(site.url(confirm), timeout=5)
    assert subscriber(site.nl, "scanned@example.com").status == Status.UNCONFIRMED

    unsubscribe = confirmed(site, smtp, "kept@example.com")
    for _ in range(5):
        page = site.get(unsubscribe)
        assert page.status_code == 200 and '<form method="post"' in page.text
        requests.head(site.url(unsubscribe), timeout=5)
    assert subscriber(site.nl, "kept@example.com").status == Status.CONFIRMED


@pytest.mark.parametrize("encoding", ["urlencoded", "multipart"])
def test_one_click_unsubscribe_rfc8058(site, smtp, encoding: str) -> None:
    link = confirmed(site, smtp)
    body = (
        {"data": {"List-Unsubscribe": "One-Click"}}
        if encoding == "urlencoded"
        else {"files": {"List-Unsubscribe": (None, "One-Click")}}
    )
    for _ in range(2):  # a repeat is harmless
        response = site.post(link, **body)
        assert response.status_code == 200
        assert "Location" not in response.headers and "Set-Cookie" not in response.headers
    assert subscriber(site.nl, "reader@example.com").status == Status.UNSUBSCRIBED


def test_unsubscribe_button_on_the_page(site, smtp) -> None:
    link = confirmed(site, smtp)
    response = site.press(link)
    assert response.status_code == 200 and "You're unsubscribed" in response.text
    assert subscriber(site.nl, "reader@example.com").status == Status.UNSUBSCRIBED


def test_a_token_cannot_unsubscribe_someone_else(site, smtp) -> None:
    mine = confirmed(site, smtp, "me@example.com")
    confirmed(site, smtp, "other@example.com")
    other_id = subscriber(site.nl, "other@example.com").id
    forged = {
        "wrong key": URLSafeSerializer(["guessed-secret"], salt=UNSUBSCRIBE_SALT).dumps(other_id),
        "other payload, my signature": URLSafeSerializer(["x"], salt=UNSUBSCRIBE_SALT).dumps(other_id).split(".")[0]
        + "."
        + token_of(mine).split(".")[1],
        "confirm purpose": site.nl.tokens.confirm_token(other_id, "n"),
        "cut short": token_of(mine)[:-3],
    }
    for name, token in forged.items():
        response = site.post(f"/unsubscribe/{token}", data={"List-Unsubscribe": "One-Click"})
        assert response.status_code == 400, name
    assert subscriber(site.nl, "other@example.com").status == Status.CONFIRMED
    assert subscriber(site.nl, "me@example.com").status == Status.CONFIRMED


@pytest.mark.parametrize(
    "address",
    [
        "",
        "   ",
        "no-at-sign",
        "two@@example.com",
        "a@b",
        "reader@localhost",
        "Name <reader@example.com>",
        "reader@exa mple.com",
        "x" * 300 + "@example.com",
        "jörg@example.com",
        "reader@example.com\r\nBcc: x@y.z",
    ],
)
def test_malformed_address_gets_400_and_nothing_is_stored(site, smtp, address: str) -> None:
    response = site.subscribe(address)
    assert response.status_code == 400
    assert 'class="error"' in response.text and 'name="email"' in response.text
    assert site.record_signups() == 0
    assert count(site.nl, Subscriber) == 0 and count(site.nl, OutboxMessage) == 0


def test_missing_field_is_a_400(site) -> None:
    assert site.post("/subscribe", data={}).status_code == 400
    assert site.record_signups() == 0


def test_smtp_down_during_subscribe_then_up(site, smtp_port) -> None:
    started = time.monotonic()
    response = site.subscribe("patient@example.com")
    assert response.status_code == 200 and time.monotonic() - started < 2
    with pytest.raises(MailerError):
        site.deliver_outbox()

    sink = SMTPSink()
    controller = Controller(sink, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    try:
        site.deliver_outbox()
    finally:
        controller.stop()
    [message] = sink.to("patient@example.com")
    assert "/confirm/" in message.text


def test_healthz(site) -> None:
    response = site.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok", "database": "ok"}


def test_unknown_page_and_wrong_method(site) -> None:
    assert site.get("/nope").status_code == 404
    assert site.get("/subscribe").status_code == 405
    assert "Traceback" not in site.get("/nope").text


def test_links_in_emails_already_sent_keep_working_with_the_faster_signing() -> None:
    """The unsubscribe and manage tokens are what itsdangerous made before, for the newest key, so that links
    in every email already in an inbox keep working."""
    keys = ["an-old-key", "the-newest-key"]
    tokens = Tokens(keys, 3600)
    for subscriber_id in (0, 1, 42, 123_456, 99_999_999_999):
        assert tokens.unsubscribe_token(subscriber_id) == URLSafeSerializer(keys, salt=UNSUBSCRIBE_SALT).dumps(
            subscriber_id
        )
        assert tokens.manage_token(subscriber_id) == URLSafeSerializer(keys, salt=MANAGE_SALT).dumps(subscriber_id)
