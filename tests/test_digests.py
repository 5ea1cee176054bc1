"""Instant, daily and weekly email: when digests are due, what is in them, and that every post reaches every
reader exactly once, whatever frequency they switch to. A clock the test controls drives the engine."""

from __future__ import annotations

import random
import re
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy

import pytest
from sqlalchemy import func, select, update

from newsletter import db, digests, dispatch, roster
from newsletter.config import DigestConfig
from newsletter.digests import periods
from newsletter.mailer import MemoryTransport
from newsletter.models import Delivery, DeliveryStatus, Digest, Post, Subscriber, utcnow
from newsletter.runtime import Newsletter
from newsletter.subscriptions import set_frequency
from newsletter.worker import run_worker

from .conftest import publish as publish_entry
from .conftest import wait_for
from .test_cli import newsletter

MONDAY = datetime(2026, 11, 30, tzinfo=UTC)  # a Monday


@pytest.fixture
def extra_config() -> str:
    return '[digest]\nsend_hour = 8\nweekday = "monday"\ntimezone = "UTC"\n'


def at(day: int, hour: int, minute: int = 0) -> datetime:
    """DAY days after MONDAY, at HOUR:MINUTE UTC."""
    return MONDAY + timedelta(days=day, hours=hour, minutes=minute)


@pytest.mark.parametrize(
    "config, now, daily, weekly",
    [
        (DigestConfig(), at(0, 9), at(0, 8), at(0, 8)),
        (DigestConfig(), at(0, 7, 59), at(-1, 8), at(-7, 8)),
        (DigestConfig(), at(2, 8), at(2, 8), at(0, 8)),
        (DigestConfig(weekday="sunday", send_hour=0), at(6, 0), at(6, 0), at(6, 0)),
        (DigestConfig(weekday="sunday", send_hour=0), at(5, 23), at(5, 0), at(-1, 0)),
        # Paris is UTC+1 in winter: 8:00 there is 7:00 UTC
        (DigestConfig(timezone="Europe/Paris"), at(0, 7, 30), at(0, 7), at(0, 7)),
        # Paris moves to UTC+2 on 29 March 2026 at 2:00: 8:00 that day is 6:00 UTC, the day before 7:00 UTC
        (
            DigestConfig(timezone="Europe/Paris"),
            datetime(2026, 3, 29, 6, 30, tzinfo=UTC),
            datetime(2026, 3, 29, 6, tzinfo=UTC),
            datetime(2026, 3, 23, 7, tzinfo=UTC),
        ),
        (
            DigestConfig(timezone="Europe/Paris"),
            datetime(2026, 3, 29, 5, 59, tzinfo=UTC),
            datetime(2026, 3, 28, 7, tzinfo=UTC),
            datetime(2026, 3, 23, 7, tzinfo=UTC),
        ),
        # New York, 8:00 local, on a Monday evening UTC that is still Monday there
        (DigestConfig(timezone="America/New_York"), at(1, 1), at(0, 13), at(0, 13)),
    ],
)
def test_the_period_a_digest_is_due_in(config: DigestConfig, now: datetime, daily: datetime, weekly: datetime) -> None:
    assert periods(config, now) == {"daily": daily, "weekly": weekly}


def reader(nl: Newsletter, address: str, frequency: str) -> None:
    roster.add_subscriber(nl, address, confirmed=True)
    choose(nl, address, frequency)


def choose(nl: Newsletter, address: str, frequency: str) -> None:
    with nl.sessions.begin() as session:
        subscriber = session.scalars(select(Subscriber).where(Subscriber.email_key == address)).one()
        set_frequency(subscriber, frequency)


def readers_added(nl: Newsletter, run, readers: list[tuple[str, str]]) -> None:
    """Each (address, frequency) added as the owner does (`subscribers add --confirmed`), on that frequency."""
    for address, frequency in readers:
        assert run("subscribers", "add", address, "--confirmed").exit_code == 0
        choose(nl, address, frequency)


def publish(nl: Newsletter, title: str, when: datetime) -> None:
    with nl.sessions.begin() as session:
        session.add(Post(guid=title, url=f"https://blog.example/{title}/", title=title, published_at=when))


def send(nl: Newsletter, now: datetime) -> dispatch.SendReport:
    with db.sender_lock(nl.engine) as sender_id:
        return dispatch.send(nl, sender_id, now=now)


def inbox(memory: MemoryTransport) -> list[tuple[str, str, list[str]]]:
    """Each email so far: recipient, subject, and the post titles it links to in its text part, in order."""
    found = []
    for envelope in memory.delivered:
        message = message_from_bytes(envelope.data, policy=policy.default)
        text = message.get_body(("plain",)).get_content()
        titles = re.findall(r"https://blog\.example/([^/]+)/", text)
        found.append((envelope.recipient, str(message["Subject"]), list(dict.fromkeys(titles))))
    memory.delivered.clear()
    return found


@pytest.fixture(params=[digests.READERS_PER_TRANSACTION, 2], ids=["one-transaction", "two-readers-a-transaction"])
def readers_per_transaction(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """How many readers' digests are made in one transaction; with 2, the send starts on the first
    transaction's digests while the others are being made."""
    monkeypatch.setattr(digests, "READERS_PER_TRANSACTION", request.param)
    return request.param


@pytest.mark.usefixtures("readers_per_transaction")
def test_instant_daily_and_weekly_readers_over_a_week(nl: Newsletter, memory: MemoryTransport) -> None:
    reader(nl, "now@example.com", "instant")
    reader(nl, "day@example.com", "daily")
    reader(nl, "week@example.com", "weekly")

    publish(nl, "a", at(0, 6))
    report = send(nl, at(0, 9))
    assert (report.posts, report.digests) == (1, 2)
    assert sorted(inbox(memory)) == [
        ("day@example.com", "Daily digest from Harbour Notes: a", ["a"]),
        ("now@example.com", "a", ["a"]),
        ("week@example.com", "Weekly digest from Harbour Notes: a", ["a"]),
    ]
    assert send(nl, at(0, 10)).sent == 0  # the same day: no second digest

    publish(nl, "b", at(0, 12))
    send(nl, at(0, 12, 5))
    assert inbox(memory) == [("now@example.com", "b", ["b"])]
    send(nl, at(1, 7, 59))  # before send_hour: the daily digest is not due yet
    assert inbox(memory) == []
    send(nl, at(1, 8, 15))
    assert inbox(memory) == [("day@example.com", "Daily digest from Harbour Notes: b", ["b"])]

    send(nl, at(2, 8))  # a day without posts sends nothing
    assert inbox(memory) == []
    publish(nl, "c", at(2, 9))
    publish(nl, "d", at(2, 10))
    send(nl, at(2, 11))
    assert sorted(inbox(memory)) == [("now@example.com", "c", ["c"]), ("now@example.com", "d", ["d"])]
    send(nl, at(3, 8))
    assert inbox(memory) == [("day@example.com", "Daily digest from Harbour Notes: c and 1 more", ["c", "d"])]
    send(nl, at(7, 8))
    assert inbox(memory) == [("week@example.com", "Weekly digest from Harbour Notes: b and 2 more", ["b", "c", "d"])]


def test_a_reader_back_on_instant_gets_what_waited_at_once(nl: Newsletter, memory: MemoryTransport) -> None:
    reader(nl, "reader@example.com", "weekly")
    send(nl, at(0, 9))
    publish(nl, "a", at(1, 9))
    publish(nl, "b", at(1, 10))
    send(nl, at(1, 11))
    assert inbox(memory) == []
    choose(nl, "reader@example.com", "instant")
    send(nl, at(1, 12))
    assert inbox(memory) == [("reader@example.com", "Posts you missed from Harbour Notes: a and 1 more", ["a", "b"])]
    publish(nl, "c", at(1, 13))
    send(nl, at(1, 14))
    assert inbox(memory) == [("reader@example.com", "c", ["c"])]


def test_the_digest_a_reader_had_counts_for_the_frequency_they_switch_to(
    nl: Newsletter, memory: MemoryTransport
) -> None:
    """Monday's weekly digest does not serve Wednesday's daily one; Wednesday's daily digest serves the
    weekly period that began on Monday."""
    reader(nl, "switcher@example.com", "weekly")
    reader(nl, "other@example.com", "daily")
    publish(nl, "a", at(0, 6))
    send(nl, at(0, 9))
    assert sorted(inbox(memory)) == [
        ("other@example.com", "Daily digest from Harbour Notes: a", ["a"]),
        ("switcher@example.com", "Weekly digest from Harbour Notes: a", ["a"]),
    ]
    publish(nl, "b", at(2, 6))
    choose(nl, "switcher@example.com", "daily")
    send(nl, at(2, 9))
    assert sorted(inbox(memory)) == [
        ("other@example.com", "Daily digest from Harbour Notes: b", ["b"]),
        ("switcher@example.com", "Daily digest from Harbour Notes: b", ["b"]),
    ]
    publish(nl, "c", at(2, 10))
    choose(nl, "other@example.com", "weekly")
    send(nl, at(2, 11))
    assert inbox(memory) == []
    send(nl, at(3, 9))
    assert inbox(memory) == [("switcher@example.com", "Daily digest from Harbour Notes: c", ["c"])]
    send(nl, at(7, 9))
    assert inbox(memory) == [("other@example.com", "Weekly digest from Harbour Notes: c", ["c"])]


@pytest.mark.usefixtures("readers_per_transaction")
def test_every_post_reaches_every_reader_once_whatever_they_switch_to(nl: Newsletter, memory: MemoryTransport) -> None:
    """Ten readers switch frequency at random over four weeks of posts and sends every few hours."""
    rng = random.Random(20261203)
    frequencies = ["instant", "daily", "weekly"]
    addresses = [f"reader{i}@example.com" for i in range(10)]
    for address in addresses:
        reader(nl, address, rng.choice(frequencies))
    received: Counter[tuple[str, str]] = Counter()
    published = []
    clock = at(0, 0)
    for step in range(4 * 7 * 6):
        clock += timedelta(hours=4)
        if rng.random() < 0.4:
            title = f"post{step}"
            publish(nl, title, clock)
            published.append(title)
        if rng.random() < 0.1:
            choose(nl, rng.choice(addresses), rng.choice(frequencies))
        send(nl, clock)
        for recipient, _, titles in inbox(memory):
            received.update((recipient, title) for title in titles)
    for address in addresses:
        choose(nl, address, "instant")
    send(nl, clock + timedelta(hours=1))
    for recipient, _, titles in inbox(memory):
        received.update((recipient, title) for title in titles)
    assert received == Counter({(address, title): 1 for address in addresses for title in published})


def test_a_digest_is_one_rendering_for_all_who_get_the_same_posts(nl: Newsletter, memory: MemoryTransport) -> None:
    for i in range(30):
        reader(nl, f"reader{i}@example.com", "daily")
    publish(nl, "a", at(0, 6))
    publish(nl, "b", at(0, 7))
    rendered = []
    original = nl.render

    def counting(name: str, **context: object) -> str:
        rendered.append(name)
        return original(name, **context)

    nl.render = counting  # type: ignore[method-assign]
    report = send(nl, at(0, 9))
    assert report.digests == 30 and report.sent == 30
    assert rendered == ["email/digest.txt", "email/digest.html"]
    ids = {message_from_bytes(e.data)["Message-ID"] for e in memory.delivered}
    assert len(ids) == 30  # each message its own Message-ID


def test_a_post_announced_before_a_reader_confirmed_is_not_in_their_first_digest(
    nl: Newsletter, memory: MemoryTransport
) -> None:
    reader(nl, "early@example.com", "daily")
    send(nl, at(0, 9))  # today's digest: nothing to send yet
    publish(nl, "before", at(0, 10))
    send(nl, at(0, 10, 5))
    reader(nl, "late@example.com", "daily")
    publish(nl, "after", at(0, 11))
    send(nl, at(0, 11, 5))
    send(nl, at(1, 8))
    assert sorted(inbox(memory)) == [
        ("early@example.com", "Daily digest from Harbour Notes: before and 1 more", ["before", "after"]),
        ("late@example.com", "Daily digest from Harbour Notes: after", ["after"]),
    ]


@pytest.fixture
def five_a_day(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEWSLETTER_SMTP__MAX_PER_DAY", "5")


def a_day_passes(nl: Newsletter) -> None:
    """Stand-in for tomorrow: every email sent so far, notification or digest, was sent more than a day ago."""
    with nl.sessions.begin() as session:
        for ledger in (Delivery, Digest):
            session.execute(
                update(ledger)
                .where(ledger.status == DeliveryStatus.SENT)
                .values(updated_at=utcnow() - timedelta(days=1, minutes=1))
            )


@pytest.mark.usefixtures("readers_per_transaction")
def test_max_per_day_holds_digests_too_and_the_next_day_sends_the_rest(
    five_a_day, nl: Newsletter, memory: MemoryTransport
) -> None:
    instant = ["now0@example.com", "now1@example.com"]
    daily = [f"day{i}@example.com" for i in range(5)]
    for address in instant:
        reader(nl, address, "instant")
    for address in daily:
        reader(nl, address, "daily")
    publish(nl, "a", at(0, 6))
    first = send(nl, at(0, 9))
    assert (first.posts, first.digests, first.sent, first.quota_reached) == (1, 5, 5, True)
    assert "stopped at [smtp] max_per_day: the next run continues" in first.summary()
    got = inbox(memory)
    assert sorted(to for to, _, _ in got if to in instant) == instant
    assert len(got) == 5
    again = send(nl, at(0, 10))  # the same day: the quota is used up, by notifications and digests alike
    assert (again.sent, again.quota_reached) == (0, True)
    assert inbox(memory) == []

    a_day_passes(nl)
    second = send(nl, at(1, 9))
    assert (second.sent, second.quota_reached) == (2, False)
    got += inbox(memory)
    assert sorted(to for to, _, _ in got) == sorted(instant + daily)  # every reader once
    assert all(titles == ["a"] for _, _, titles in got)


# ---- the real command over real SMTP ------------------------------------------------------------


def digest_due_now() -> str:
    """[digest] settings under which every digest is due now: hour 0 of today, today being the weekday."""
    today = datetime.now(UTC).strftime("%A").lower()
    return f'[digest]\nsend_hour = 0\nweekday = "{today}"\ntimezone = "UTC"\n'


@pytest.mark.parametrize("extra_config", [digest_due_now()])
def test_three_readers_get_what_they_chose_from_the_real_command(nl, run, smtp, feed, config_file) -> None:
    assert run("posts", "fetch").exit_code == 0
    readers = [("now@example.com", "instant"), ("day@example.com", "daily"), ("week@example.com", "weekly")]
    readers_added(nl, run, readers)
    publish_entry(feed, "First light", "first-light")
    dry = newsletter(config_file, "send", "--dry-run")
    assert "would announce: First light" in dry.stdout
    assert "dry run: digests due now: 1 daily, 1 weekly; nothing sent" in dry.stdout
    first = newsletter(config_file, "send")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "1 post(s), 2 digest(s): 3 sent, 0 failed, 0 skipped, 0 left for the next run"
    [instant] = smtp.to("now@example.com")
    [daily] = smtp.to("day@example.com")
    [weekly] = smtp.to("week@example.com")
    assert instant.message["Subject"] == "First light"
    assert daily.message["Subject"] == "Daily digest from Harbour Notes: First light"
    assert weekly.message["Subject"] == "Weekly digest from Harbour Notes: First light"
    for message in (daily, weekly):
        assert message.message["List-Unsubscribe"].startswith("<https://news.example.com/unsubscribe/")
        assert message.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert "https://harbour-notes.example/2025/04/first-light/" in message.links()

    publish_entry(feed, "Second tide", "second-tide")
    second = newsletter(config_file, "send")
    assert second.stdout.strip() == "1 post(s): 1 sent, 0 failed, 0 skipped, 0 left for the next run"
    assert [m.message["Subject"] for m in smtp.to("now@example.com")] == ["First light", "Second tide"]
    assert "digests due" not in newsletter(config_file, "send", "--dry-run").stdout

    with nl.sessions.begin() as session:  # a day later for the daily reader: their digest was yesterday's
        subscriber = session.scalars(select(Subscriber).where(Subscriber.email_key == "day@example.com")).one()
        for digest in session.scalars(select(Digest).where(Digest.subscriber_id == subscriber.id)):
            digest.period -= timedelta(days=1)
    third = newsletter(config_file, "send")
    assert third.returncode == 0, third.stderr
    assert third.stdout.strip() == "0 post(s), 1 digest(s): 1 sent, 0 failed, 0 skipped, 0 left for the next run"
    assert smtp.to("day@example.com")[-1].message["Subject"] == "Daily digest from Harbour Notes: Second tide"
    assert len(smtp.to("week@example.com")) == 1


@pytest.mark.parametrize("extra_config", [digest_due_now()])
def test_a_sample_digest_to_one_address_records_nothing(nl, run, smtp, feed, config_file) -> None:
    assert run("posts", "fetch").exit_code == 0
    publish_entry(feed, "First light", "first-light")
    publish_entry(feed, "Second tide", "second-tide")
    assert run("posts", "fetch").exit_code == 0
    sample = newsletter(config_file, "send", "--to", "owner@example.com", "--digest", "weekly")
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.strip().startswith("sent a sample weekly digest of ")
    [message] = smtp.to("owner@example.com")
    assert str(message.message["Subject"]).startswith("Weekly digest from Harbour Notes: ")
    alone = newsletter(config_file, "send", "--digest", "daily")
    assert alone.returncode == 1 and alone.stderr.strip() == (
        "Error: --digest goes with --to ADDRESS: it sends a sample digest to that address"
    )
    with nl.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Digest)) == 0


@pytest.mark.parametrize("extra_config", [digest_due_now()])
def test_a_digest_carries_the_headers_of_a_notification(nl, run, smtp, feed) -> None:
    assert run("posts", "fetch").exit_code == 0
    readers_added(nl, run, [("now@example.com", "instant"), ("day@example.com", "daily")])
    publish_entry(feed, "First light", "first-light")
    assert run("send").exit_code == 0
    [notification] = smtp.to("now@example.com")
    [digest] = smtp.to("day@example.com")
    assert sorted(digest.message.keys()) == sorted(notification.message.keys())
    for header in ("From", "List-Id", "Precedence", "Auto-Submitted", "List-Unsubscribe-Post", "MIME-Version"):
        assert digest.message[header] == notification.message[header], header
    for message in (notification, digest):
        assert message.message["List-Unsubscribe"].startswith("<https://news.example.com/unsubscribe/")
    assert digest.message["List-Unsubscribe"] != notification.message["List-Unsubscribe"]  # each reader's own


@pytest.mark.parametrize("extra_config", [digest_due_now() + "[schedule]\npoll_minutes = 1\n"])
def test_the_worker_sends_the_digests_that_are_due(nl, run, smtp, feed) -> None:
    """No cron: the worker of `newsletter serve` fetches the feed as it polls and sends the digests due."""
    assert run("posts", "fetch").exit_code == 0
    readers_added(nl, run, [("day@example.com", "daily"), ("week@example.com", "weekly")])
    publish_entry(feed, "First light", "first-light")
    stop = threading.Event()
    worker = threading.Thread(target=run_worker, args=(nl, stop, 0.1))
    worker.start()
    try:
        wait_for(lambda: len(smtp.messages) >= 2)
    finally:
        stop.set()
        worker.join(timeout=10)
    assert not worker.is_alive()
    assert smtp.subjects("day@example.com") == ["Daily digest from Harbour Notes: First light"]
    assert smtp.subjects("week@example.com") == ["Weekly digest from Harbour Notes: First light"]
