"""A public form under attack: rate limits, subscription bombing, bots, cross-site posts, CSRF."""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from datetime import timedelta

import pytest
import requests
from sqlalchemy import func, select

from newsletter import signups
from newsletter.models import Confirmation, OutboxMessage, Signup, Status, Subscriber
from newsletter.ratelimit import SignupLimit
from newsletter.subscriptions import Requester

from .test_reader_flow import confirm_link


@pytest.fixture
def extra_config() -> str:
    return """
[web]
embed_origins = ["https://harbour-notes.example"]
signup_ceiling = 5
"""


def count(nl, model, *where) -> int:
    with nl.sessions() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where))


def age_confirmations(nl, minutes: int) -> None:
    """Stand-in for time passing: every confirmation email so far was sent MINUTES earlier."""
    with nl.sessions.begin() as session:
        for confirmation in session.scalars(select(Confirmation)):
            confirmation.sent_at -= timedelta(minutes=minutes)


def test_per_ip_limit_gives_429_and_stores_nothing(site, smtp) -> None:
    for i in range(10):
        assert site.subscribe(f"reader{i}@example.com").status_code == 200
    over = site.subscribe("one-too-many@example.com")
    assert over.status_code == 429 and int(over.headers["Retry-After"]) > 3500
    assert "Too many sign-ups" in over.text and "try again later" in over.text
    assert count(site.nl, Signup) == 10
    assert site.record_signups() == 10
    assert count(site.nl, Subscriber, Subscriber.email_key == "one-too-many@example.com") == 0
    assert count(site.nl, Subscriber) == 10


def test_the_limit_is_shared_by_every_web_process(site, app, smtp) -> None:
    """A second app on the same database (another worker process) sees the same counts."""
    from newsletter.web.app import create_app

    other = create_app(site.nl.config).test_client()
    for i in range(5):
        site.subscribe(f"reader{i}@example.com")
    for i in range(5):
        assert other.post("/subscribe", data=site.form(f"other{i}@example.com")).status_code == 200
    assert other.post("/subscribe", data=site.form("late@example.com")).status_code == 429
    assert site.subscribe("late@example.com").status_code == 429


def test_forwarded_for_is_ignored_without_a_trusted_proxy(site, smtp) -> None:
    for i in range(10):
        site.post("/subscribe", data=site.form(f"r{i}@example.com"), headers={"X-Forwarded-For": f"10.0.0.{i}"})
    spoofed = site.post("/subscribe", data=site.form("x@example.com"), headers={"X-Forwarded-For": "10.9.9.9"})
    assert spoofed.status_code == 429


@pytest.mark.parametrize("extra_config", ["[web]\ntrusted_proxies = 1\n"])
def test_forwarded_for_is_the_client_behind_a_trusted_proxy(site, smtp) -> None:
    for i in range(12):
        response = site.post(
            "/subscribe", data=site.form(f"r{i}@example.com"), headers={"X-Forwarded-For": f"203.0.113.{i}"}
        )
        assert response.status_code == 200, (i, response.text)
    site.record_signups()
    with site.nl.sessions() as session:
        assert (
            session.scalar(select(Subscriber.subscribed_ip).where(Subscriber.email_key == "r3@example.com"))
            == "203.0.113.3"
        )
    for _ in range(10):
        site.post("/subscribe", data=site.form("same@example.com"), headers={"X-Forwarded-For": "198.51.100.7"})
    assert (
        site.post(
            "/subscribe", data=site.form("same@example.com"), headers={"X-Forwarded-For": "198.51.100.7"}
        ).status_code
        == 429
    )


def mailbox(address: str) -> str:
    """Where mail to ADDRESS lands, as the test knows it: gmail ignores dots and +tags, and googlemail.com is
    gmail.com."""
    local, domain = address.lower().rsplit("@", 1)
    local = local.split("+", 1)[0]
    if domain in ("gmail.com", "googlemail.com"):
        return local.replace(".", "") + "@gmail.com"
    return f"{local}@{domain}"


@pytest.mark.parametrize("extra_config", ['[web]\ntrusted_proxies = 1\nrate_limit = "1000 per hour"\n'])
def test_subscription_bombing_one_mailbox_gets_at_most_three_a_day(site, smtp) -> None:
    """Every spelling of two victims' mailboxes, each from its own IP and network, five rounds 11 minutes
    apart: each mailbox gets 1 email per 10 minutes and 3 a day, and every page is the same."""
    variants = [
        "victim@example.com",
        "Victim+1@example.com",
        "victim+news@Example.COM",
        "jane.doe@gmail.com",
        "JaneDoe+news@gmail.com",
        "j.a.n.e.d.o.e@googlemail.com",
        "Jane.Doe+x@GoogleMail.com",
    ]
    pages = set()
    for round_ in range(5):
        for i, address in enumerate(variants * 2):
            forwarded = {"X-Forwarded-For": f"10.{round_}.{i}.1"}
            pages.add(site.post("/subscribe", data=site.form(address), headers=forwarded).text)
        site.record_signups()
        age_confirmations(site.nl, 11)
    site.deliver_outbox()
    received = [mailbox(m.recipients[0]) for m in smtp.messages]
    assert sorted(received) == ["janedoe@gmail.com"] * 3 + ["victim@example.com"] * 3
    assert len(pages) == 1


def test_circuit_breaker_holds_confirmations_and_stats_says_so(site, smtp, run) -> None:
    for i in range(8):
        site.subscribe(f"stranger{i}@example.com")
    site.deliver_outbox()
    assert len(smtp.messages) == 5
    assert count(site.nl, OutboxMessage, OutboxMessage.held.is_(True)) == 3
    stats = run("stats").output
    assert "3 held" in stats and "HELD" in stats

    with site.nl.sessions.begin() as session:  # an hour later the flood has stopped
        for signup in session.scalars(select(Signup)):
            signup.received_at -= 2 * 3600
    site.deliver_outbox()
    assert len(smtp.messages) == 8
    assert "HELD" not in run("stats").output


def test_a_filled_hidden_field_asks_to_press_again_and_nothing_happens(site, smtp) -> None:
    human = site.subscribe("human@example.com")
    bot = site.post("/subscribe", data=site.form("victim@example.com", website="http://spam.example"))
    assert human.status_code == 200 and "Check your inbox" in human.text
    assert bot.status_code == 400 and "Check your inbox" not in bot.text
    assert "Nothing was sent yet: please press Subscribe again." in bot.text
    assert 'value="victim@example.com"' in bot.text  # the address stays filled in for the second press
    assert site.record_signups() == 1
    assert count(site.nl, Subscriber, Subscriber.email_key == "victim@example.com") == 0


def test_a_form_returned_too_fast_asks_to_press_again_and_the_second_press_counts(site, smtp) -> None:
    """Browser autofill sends a form within a second: the person is told why and presses again."""
    stamp = re.search(r'name="started" value="([^"]+)"', site.get("/").text).group(1)
    fast = site.post("/subscribe", data={"email": "fast@example.com", "started": stamp})
    assert fast.status_code == 400 and "quicker than a person usually fills it in" in fast.text
    assert "Check your inbox" not in fast.text and site.record_signups() == 0
    fresh = re.search(r'name="started" value="([^"]+)"', fast.text).group(1)
    time.sleep(site.nl.config.web.min_fill_seconds + 0.1)
    again = site.post("/subscribe", data={"email": "fast@example.com", "started": fresh})
    assert again.status_code == 200 and "Check your inbox" in again.text
    site.deliver_outbox()
    assert [m.recipients for m in smtp.messages] == [["fast@example.com"]]


def test_a_forged_stale_or_missing_form_stamp_asks_to_press_again(site, smtp) -> None:
    forged = site.post("/subscribe", data={"email": "forged@example.com", "started": "form.AAAAAA.forged"})
    stale = site.post("/subscribe", data=site.form("stale@example.com", opened_ago=25 * 3600))
    missing = site.post("/subscribe", data={"email": "missing@example.com"})
    assert "came back damaged" in forged.text
    assert "opened more than a day ago" in stale.text
    assert "without the part that shows it was opened here" in missing.text
    for page in (forged, stale, missing):
        assert page.status_code == 400 and "press Subscribe again" in page.text and "Check your inbox" not in page.text
    assert site.record_signups() == 0


def test_a_malformed_address_gets_its_reason_however_fast_it_came(site, smtp) -> None:
    stamp = re.search(r'name="started" value="([^"]+)"', site.get("/").text).group(1)
    for data in (
        {"email": "not-an-address", "started": stamp},
        {"email": "not-an-address", "website": "filled"},
        {"email": "not-an-address"},
    ):
        page = site.post("/subscribe", data=data)
        assert page.status_code == 400 and "An email address must have an @-sign." in page.text
        assert "press Subscribe again" not in page.text


def test_confirmation_email_carries_nothing_the_visitor_typed_but_the_address(site, smtp) -> None:
    site.post(
        "/subscribe",
        data=site.form("target@example.com", name="Cheap pills at pills.example", comment="http://spam.example/win"),
    )
    site.deliver_outbox()
    [message] = smtp.to("target@example.com")
    assert "pills" not in message.raw.decode() and "spam.example" not in message.raw.decode()


def test_embedded_form_posts_cross_origin_without_cookies(site, smtp, run, caplog) -> None:
    snippet = run("embed").output
    assert 'action="https://news.example.com/subscribe"' in snippet and 'name="email"' in snippet
    assert 'name="website"' in snippet
    from_blog = site.post(
        "/subscribe",
        data={"email": "fan@example.com", "website": ""},
        headers={"Origin": "https://harbour-notes.example"},
    )
    assert from_blog.status_code == 200 and "Check your inbox" in from_blog.text  # the snippet has no stamp
    own_without_stamp = site.post(
        "/subscribe", data={"email": "own@example.com"}, headers={"Origin": "https://news.example.com"}
    )
    assert own_without_stamp.status_code == 400 and "press Subscribe again" in own_without_stamp.text
    with caplog.at_level(logging.WARNING):
        elsewhere = site.post(
            "/subscribe", data=site.form("victim@example.com"), headers={"Origin": "https://evil.example"}
        )
    assert elsewhere.status_code == 403  # the reader is told why and where to go; the owner's log names the fix
    assert "Sign up on the newsletter&#39;s own page" in elsewhere.text and "nothing was sent" in elsewhere.text
    assert "Forbidden" not in elsewhere.text and 'href="/"' in elsewhere.text
    assert "add 'https://evil.example' to [web] embed_origins" in caplog.text
    site.record_signups()
    assert count(site.nl, Subscriber, Subscriber.email_key == "fan@example.com") == 1
    assert count(site.nl, Subscriber, Subscriber.email_key == "victim@example.com") == 0


def test_our_own_form_posted_without_a_referer_is_accepted(site, smtp) -> None:
    """Our pages send no Referer, so a browser may post them with `Origin: null`; Sec-Fetch-Site vouches."""
    own = site.post(
        "/subscribe", data=site.form("own@example.com"), headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"}
    )
    forced_null = site.post(
        "/subscribe", data=site.form("victim@example.com"), headers={"Origin": "null", "Sec-Fetch-Site": "cross-site"}
    )
    assert own.status_code == 200 and forced_null.status_code == 403
    site.record_signups()
    assert count(site.nl, Subscriber) == 1


def test_buttons_need_their_csrf_token_but_one_click_does_not(site, smtp) -> None:
    site.subscribe("reader@example.com")
    site.deliver_outbox()
    link = confirm_link(smtp.to("reader@example.com")[0])
    assert site.post(link).status_code == 400  # a forged cross-site POST carries no token
    assert count(site.nl, Subscriber, Subscriber.status == Status.CONFIRMED) == 0
    assert site.press(link).status_code == 200
    token = site.nl.tokens.unsubscribe_token(1)
    assert site.post(f"/unsubscribe/{token}").status_code == 400
    assert count(site.nl, Subscriber, Subscriber.status == Status.CONFIRMED) == 1
    assert site.post(f"/unsubscribe/{token}", data={"List-Unsubscribe": "One-Click"}).status_code == 200
    assert count(site.nl, Subscriber, Subscriber.status == Status.UNSUBSCRIBED) == 1


def test_security_headers_on_every_page(site, smtp) -> None:
    site.subscribe("reader@example.com")
    site.deliver_outbox()
    confirm = confirm_link(smtp.to("reader@example.com")[0])
    unsubscribe = f"/unsubscribe/{site.nl.tokens.unsubscribe_token(1)}"
    pages = [
        site.get("/"),
        site.subscribe("x@example.com"),
        site.get(confirm),
        site.press(confirm),
        site.get(unsubscribe),
        site.get("/healthz"),
        site.get("/missing"),
        site.get("/confirm/bad"),
    ]
    for page in pages:
        csp = page.headers["Content-Security-Policy"]
        assert "script-src 'none'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert page.headers["Referrer-Policy"] == "no-referrer"
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        assert page.headers["Cache-Control"] == "no-store"
        assert "<script" not in page.text


def test_tokens_carry_no_readable_address(site, smtp) -> None:
    site.subscribe("private.person@example.com")
    site.deliver_outbox()
    link = confirm_link(smtp.to("private.person@example.com")[0])
    for token in (link.rsplit("/", 1)[1], site.nl.tokens.unsubscribe_token(1)):
        payload = token.split(".")[0]
        decoded = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        assert b"@" not in decoded and b"private" not in decoded


@pytest.mark.parametrize("extra_config", ['[web]\nrate_limit = "1000 per hour"\n'])
def test_fifty_concurrent_submissions_make_one_subscriber(site, smtp) -> None:
    responses: list[requests.Response] = []
    barrier = threading.Barrier(50)

    def submit(i: int) -> None:
        barrier.wait()
        responses.append(requests.post(f"{site.base}/subscribe", data=site.form("Same.Person@example.com"), timeout=30))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(responses) == 50
    assert {r.status_code for r in responses} == {200}
    assert site.record_signups() == 50
    assert count(site.nl, Subscriber) == 1
    assert count(site.nl, OutboxMessage) == 1


@pytest.mark.parametrize("extra_config", ['[web]\ntrusted_proxies = 1\nrate_limit = "3 per hour"\n'])
def test_an_ipv6_client_is_limited_by_its_slash_64(site, smtp) -> None:
    """One household holds a whole IPv6 /64: changing the last 64 bits does not get around the limit."""
    for i, ip in enumerate(["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:abcd::3"]):
        assert site.subscribe(f"r{i}@example.com", headers={"X-Forwarded-For": ip}).status_code == 200
    assert site.subscribe("r3@example.com", headers={"X-Forwarded-For": "2001:db8:1:2:ffff::9"}).status_code == 429
    assert site.subscribe("r4@example.com", headers={"X-Forwarded-For": "2001:db8:1:3::1"}).status_code == 200
    site.record_signups()
    with site.nl.sessions() as session:
        stored = session.scalar(select(Subscriber.subscribed_ip).where(Subscriber.email_key == "r2@example.com"))
    assert stored == "2001:db8:1:2:abcd::3"  # the consent record keeps the whole address


@pytest.mark.parametrize("extra_config", ["[web]\ntrusted_proxies = 1\n"])
def test_a_forwarded_for_that_is_not_an_ip_is_refused_and_never_stored(site, smtp) -> None:
    for forwarded in ["not-an-ip", "203.0.113.9, <script>", "203.0.113.9 extra", "unknown"]:
        page = site.subscribe("reader@example.com", headers={"X-Forwarded-For": forwarded})
        assert page.status_code == 400, forwarded
        assert "not an IP address" in page.text
    assert count(site.nl, Signup) == 0
    assert site.subscribe("reader@example.com", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 200


@pytest.mark.parametrize(
    "extra_config",
    ['[web]\ntrusted_proxies = 1\nrate_limit = "1000 per hour"\nsignup_ceiling = 30\nnetwork_ceiling = 5\n'],
)
@pytest.mark.parametrize("batch", [500, 4])
def test_a_flood_from_a_few_networks_holds_only_their_own_confirmations(site, smtp, run, monkeypatch, batch) -> None:
    """Four /24s submit 15 strangers' addresses each, from many IPs: past 5 a network, their emails are
    held. A reader from another network then signs up and gets their confirmation at once. The same
    whether the worker takes the sign-ups in one batch or in batches that end anywhere in the flood."""
    monkeypatch.setattr(signups, "SIGNUP_BATCH", batch)
    for net in range(4):
        for i in range(15):
            forwarded = {"X-Forwarded-For": f"198.51.{net}.{i + 1}"}
            assert site.subscribe(f"stranger{net}-{i}@example.com", headers=forwarded).status_code == 200
    assert site.subscribe("reader@example.com", headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 200
    site.deliver_outbox()
    assert len(smtp.to("reader@example.com")) == 1
    assert len(smtp.messages) == 4 * 5 + 1
    assert count(site.nl, OutboxMessage, OutboxMessage.held.is_(True)) == 4 * 10
    assert "HELD" in run("stats").output


@pytest.mark.parametrize("extra_config", ["[web]\nsignup_ceiling = 1000\nnetwork_ceiling = 1000\n"])
def test_workers_side_by_side_make_one_subscriber_and_one_confirmation_per_mailbox(site, smtp, monkeypatch) -> None:
    """Three workers drain one log at once, in small batches: the sign-ups spell 40 mailboxes in changing
    orders and cases, so every batch shares mailboxes with the others'. No sign-up is lost or recorded
    twice, and each mailbox gets one subscriber per address and one confirmation email."""
    monkeypatch.setattr(signups, "SIGNUP_BATCH", 25)
    log = signups.SignupLog(site.nl.engine, SignupLimit("100000 per hour"))
    for round_ in range(10):
        for i in range(40):
            n = (i * 7 + round_ * 13) % 40
            address = f"Reader{n}+r{round_ % 2}@example.com" if round_ % 3 else f"reader{n}@example.com"
            assert log.add(address, Requester(ip=f"10.{round_}.{i}.1")) is None
    recorded: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            recorded.append(signups.process_signups(site.nl))
        except BaseException as exc:  # a deadlock or a unique violation would end up here
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == [] and sum(recorded) == 400
    assert count(site.nl, Signup, Signup.processed_at.is_(None)) == 0
    assert count(site.nl, Subscriber) == 40 * 3  # reader{n}, reader{n}+r0 and reader{n}+r1 are three addresses
    site.deliver_outbox()
    assert sorted(m.recipients[0].lower().split("+")[0].split("@")[0] for m in smtp.messages) == sorted(
        f"reader{n}" for n in range(40)
    )
