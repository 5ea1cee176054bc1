"""A reader's manage page over real HTTP, reached from a real email, with link scanners opening every link
first: choices, download my data, erase me, and /manage for a link by email."""

from __future__ import annotations

import json
import re
import time

import pytest
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from sqlalchemy import func, select

from newsletter import inbound
from newsletter.models import Erased, Post, Status, Subscriber
from newsletter.tokens import MANAGE_LINK_SALT

from .conftest import publish
from .test_import import sample
from .test_inbound import BOUNCES, arf_report, sent_post
from .test_links import confirmed
from .test_reader_flow import confirm_link


def link_in(message, path: str) -> str:
    return next(url for url in message.links() if f"/{path}/" in url)


def reader_row(nl, address: str) -> Subscriber | None:
    with nl.sessions() as session:
        found = session.scalar(select(Subscriber).where(Subscriber.email_key == address))
        if found is not None:
            session.expunge(found)
        return found


def how(site, address: str) -> dict[str, str]:
    """How each step of the reader's consent record happened, as their download my data says."""
    reader = reader_row(site.nl, address)
    assert reader is not None
    link = site.nl.manage_url(reader.id)
    download = site.press(link + "/data", page=link)
    assert download.status_code == 200
    return {step: record["how"] for step, record in json.loads(download.text)["consent"].items()}


BY_FORM = "sign-up form"
BY_LINK = "confirmation link in the email sent to this address"


def scan(site, link: str) -> None:
    """What a mail security scanner does with every link: GET it, HEAD it, GET it again."""
    for method in ("GET", "HEAD", "GET"):
        assert site.request(method, link).status_code == 200


def notified(site, run, feed, smtp, address: str = "reader@example.com"):
    """A reader signed up and confirmed through the web, then a post announced to them; its email."""
    assert site.subscribe(address).status_code == 200
    site.deliver_outbox()
    assert site.press(confirm_link(smtp.to(address)[0])).status_code == 200
    site.deliver_outbox()
    with site.nl.sessions.begin() as session:
        for post in session.scalars(select(Post)):
            post.categories = ["Fishing", "Weather"]
    publish(feed, "Nets mended", "nets-mended")
    assert run("send").exit_code == 0
    return smtp.to(address)[-1]


def test_from_an_email_to_weekly_and_some_categories(site, run, feed, smtp) -> None:
    assert run("posts", "fetch").exit_code == 0
    email = notified(site, run, feed, smtp)
    assert email.message["Subject"] == "Nets mended"
    link = link_in(email, "manage")
    assert link in email.text and "Manage your subscription" in email.html
    scan(site, link)
    before = reader_row(site.nl, "reader@example.com")
    assert before.frequency == "instant"

    page = site.get(link)
    assert "reader@example.com" in page.text and 'name="frequency" value="weekly"' in page.text
    assert 'name="categories" value="Fishing"' in page.text
    changed = site.press(link, data={"frequency": "weekly", "categories": ["Fishing"]})
    assert changed.status_code == 200
    assert "You now get a weekly digest." in changed.text and "You now get posts about Fishing." in changed.text
    after = reader_row(site.nl, "reader@example.com")
    assert after.frequency == "weekly" and after.status == Status.CONFIRMED
    again = site.press(link, data={"frequency": "weekly", "categories": ["Fishing"]})
    assert "Nothing changed." in again.text
    assert site.post(link, data={"frequency": "daily"}).status_code == 400  # no CSRF token: nothing changes
    assert reader_row(site.nl, "reader@example.com").frequency == "weekly"


def test_the_unsubscribe_button_on_the_manage_page(site, run, feed, smtp) -> None:
    assert run("posts", "fetch").exit_code == 0
    link = link_in(notified(site, run, feed, smtp), "manage")
    button = re.search(r'<form method="post" action="([^"]+/unsubscribe)"', site.get(link).text)
    assert button is not None
    assert site.post(button.group(1)).status_code == 400  # no CSRF token: nothing changes
    assert reader_row(site.nl, "reader@example.com").status == Status.CONFIRMED

    left = site.press(button.group(1), page=link)
    assert left.status_code == 200 and "You're unsubscribed" in left.text
    assert reader_row(site.nl, "reader@example.com").status == Status.UNSUBSCRIBED
    page = site.get(link).text
    assert "gets no emails from Harbour Notes" in page and "/unsubscribe" not in page
    publish(feed, "Low tide", "low-tide")
    assert run("send").exit_code == 0
    assert smtp.subjects("reader@example.com")[-1] == "Nets mended"


def test_download_my_data_and_erase_me(site, run, feed, smtp, tmp_path) -> None:
    assert run("posts", "fetch").exit_code == 0
    link = link_in(notified(site, run, feed, smtp), "manage")
    download = site.press(link + "/data", page=link)
    assert download.headers["Content-Disposition"] == 'attachment; filename="my-subscription.json"'
    data = json.loads(download.text)
    assert data["email"] == "reader@example.com" and data["status"] == "confirmed"
    assert data["frequency"] == "instant" and data["categories"] == "all"
    assert data["consent"]["subscribed"]["ip"] == "127.0.0.1" and data["consent"]["confirmed"]["at"]
    assert {step: record["how"] for step, record in data["consent"].items()} == {
        "subscribed": BY_FORM,
        "confirmed": BY_LINK,
    }
    assert [mail["title"] for mail in data["emails_received"]] == ["Nets mended"]

    refused = site.press(link + "/erase", page=link)
    assert refused.status_code == 400 and "Tick the box" in refused.text
    assert reader_row(site.nl, "reader@example.com") is not None
    erased = site.press(link + "/erase", page=link, data={"sure": "yes"})
    assert erased.status_code == 200 and "erased" in erased.text
    assert reader_row(site.nl, "reader@example.com") is None
    with site.nl.sessions() as session:
        [row] = session.scalars(select(Erased))
        assert "reader" not in row.key_hash and len(row.key_hash) == 64
    assert site.get(link).status_code == 400  # the link leads nowhere now

    csv = tmp_path / "readers.csv"
    csv.write_text("email\nReader@example.com\nother@example.com\n")
    imported = run("subscribers", "import", str(csv), "--verbose")
    assert imported.output.splitlines() == [
        "imported 1; already there 0; refused 1",
        "  line 2: Reader@example.com was erased at the reader's request",
    ]
    added = run("subscribers", "add", "reader@example.com", "--confirmed")
    assert added.exit_code == 1 and "was erased at the reader's request" in added.output
    assert reader_row(site.nl, "reader@example.com") is None


def test_my_data_says_how_the_owner_added_or_imported_me(site, run, tmp_path) -> None:
    assert run("subscribers", "add", "added@example.com", "--confirmed").exit_code == 0
    for name in ("mailchimp_subscribed.csv", "mailchimp_unsubscribed.csv"):
        assert run("subscribers", "import", sample(name)).exit_code == 0
    ours = tmp_path / "readers.csv"
    ours.write_text("email,status,subscribed_ip,confirmed_ip\nours@example.com,confirmed,192.0.2.7,192.0.2.7\n")
    assert run("subscribers", "import", str(ours)).exit_code == 0

    assert how(site, "added@example.com") == {
        "subscribed": "added by the site owner from the command line",
        "confirmed": "marked confirmed by the site owner",
    }
    assert how(site, "ada@example.com") == {
        "subscribed": "imported by the site owner from Mailchimp",
        "confirmed": "imported by the site owner from Mailchimp as confirmed",
    }
    assert how(site, "left@example.com") == {
        "subscribed": "imported by the site owner from Mailchimp",
        "confirmed": "imported by the site owner from Mailchimp as confirmed",
        "unsubscribed": "imported by the site owner from Mailchimp as unsubscribed",
    }
    assert how(site, "ours@example.com") == {
        "subscribed": "imported by the site owner",
        "confirmed": "imported by the site owner as confirmed",
    }


def test_my_data_says_i_left_by_one_click_and_the_owner_forced_me_back(site, run, smtp) -> None:
    unsubscribe = confirmed(site, smtp, "leaving@example.com")
    assert site.post(unsubscribe, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    on_the_web = (
        "on the web: the unsubscribe link in an email, the Unsubscribe button of the reader's mail program, "
        "or the reader's subscription page"
    )
    assert how(site, "leaving@example.com") == {"subscribed": BY_FORM, "confirmed": BY_LINK, "unsubscribed": on_the_web}

    assert run("subscribers", "add", "leaving@example.com", "--confirmed", "--force").exit_code == 0
    forced = "marked confirmed by the site owner after the reader had left (--force)"
    assert how(site, "leaving@example.com") == {"subscribed": BY_FORM, "confirmed": forced, "unsubscribed": on_the_web}


@pytest.mark.parametrize("extra_config", [f'\n[bounces]\naddress = "{BOUNCES}"\n'], ids=["bounces"])
def test_my_data_says_i_left_by_email_or_by_a_spam_complaint(site, run, smtp, feed) -> None:
    got = sent_post(run, smtp, feed, "mailed@example.org", "angry@example.org")
    mailto = re.search(r"<mailto:([^>]+)>", got["mailed@example.org"].message["List-Unsubscribe"]).group(1)  # type: ignore[union-attr]
    raw = f"From: mailed@example.org\r\nTo: {mailto}\r\nSubject: stop\r\n\r\nplease\r\n".encode()
    assert str(inbound.handle(site.nl, raw)).startswith("unsubscribed: reader")
    assert str(inbound.handle(site.nl, arf_report(got["angry@example.org"]))).startswith("complaint: reader")

    by_hand = {
        "subscribed": "added by the site owner from the command line",
        "confirmed": "marked confirmed by the site owner",
    }
    assert how(site, "mailed@example.org") == {
        **by_hand,
        "unsubscribed": "email sent to the unsubscribe address of a newsletter email",
    }
    assert how(site, "angry@example.org") == {
        **by_hand,
        "unsubscribed": "spam complaint: the reader's email provider reported an email as spam",
    }


def test_a_link_by_email_for_known_readers_only_three_a_day(site, smtp) -> None:
    assert site.subscribe("known@example.com").status_code == 200
    site.deliver_outbox()
    smtp.messages.clear()
    assert '<a href="/manage">Manage your subscription</a>' in site.get("/").text
    ask = site.get("/manage")
    assert ask.status_code == 200 and 'name="email"' in ask.text
    known = site.press("/manage", data={"email": "Known@example.com"})
    unknown = site.press("/manage", data={"email": "stranger@example.com"})
    assert known.status_code == unknown.status_code == 200 and known.text == unknown.text
    site.deliver_outbox()
    [email] = smtp.messages
    assert email.recipients == ["known@example.com"]
    link = link_in(email, "manage")
    scan(site, link)
    assert "known@example.com" in site.get(link).text
    for _ in range(3):
        site.press("/manage", data={"email": "KNOWN@Example.com"})
    site.deliver_outbox()
    assert len(smtp.to("known@example.com")) == 3  # at most three a day, however it is spelled
    bad = site.press("/manage", data={"email": "not-an-address"})
    assert bad.status_code == 400 and "@-sign" in bad.text


def test_a_requested_link_expires_after_a_day(site, smtp) -> None:
    assert site.subscribe("reader@example.com").status_code == 200
    site.record_signups()
    subscriber_id = reader_row(site.nl, "reader@example.com").id

    class DayAndHourAgo(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - 25 * 3600

    old = URLSafeTimedSerializer([site.nl.config.security.secret_key], salt=MANAGE_LINK_SALT, signer=DayAndHourAgo)
    expired = site.get(f"/manage/{old.dumps(subscriber_id)}")
    assert expired.status_code == 400 and "expired" in expired.text
    fresh = site.get(f"/manage/{site.nl.tokens.manage_link_token(subscriber_id)}")
    assert fresh.status_code == 200


@pytest.mark.parametrize("extra_config", ['[digest]\ndefault_frequency = "daily"\n'])
def test_the_confirmation_page_offers_the_frequency(site, smtp) -> None:
    assert site.subscribe("reader@example.com").status_code == 200
    site.deliver_outbox()
    link = confirm_link(smtp.to("reader@example.com")[0])
    page = site.get(link)
    assert re.search(r'value="daily" checked', page.text)
    assert site.press(link, data={"frequency": "weekly"}).status_code == 200
    assert reader_row(site.nl, "reader@example.com").frequency == "weekly"
    site.deliver_outbox()
    welcome = smtp.to("reader@example.com")[-1]
    assert "a weekly digest of the new posts" in welcome.text
    with site.nl.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Subscriber)) == 1
