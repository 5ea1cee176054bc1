"""Sending on publish without cron: the worker of `newsletter serve` fetches and sends soon after a signed
ping to /hooks/publish, and every [schedule] poll_minutes; a cron `newsletter send` beside it never doubles."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from newsletter import db, roster
from newsletter.publish import SIGNATURE_HEADER, TOLERANCE, Schedule, run_due, sign
from newsletter.runtime import Newsletter
from newsletter.web.app import create_app

from .conftest import POSTGRES_URL, SMTPSink, free_port, publish, wait_for

SECRET = "hook-secret-0123456789abcdef0123456789"
READERS = [f"reader{i}@example.com" for i in range(12)]


@pytest.fixture
def extra_config() -> str:
    return f'[schedule]\nwebhook_secret = "{SECRET}"\n'


@pytest.fixture
def readers(nl: Newsletter, run) -> list[str]:
    """Confirmed readers, and the feed fetched once (its posts from before are not announced)."""
    for address in READERS:
        roster.add_subscriber(nl, address, confirmed=True)
    assert run("posts", "fetch").exit_code == 0
    return READERS


@pytest.fixture
def server(config_file: Path, readers) -> Iterator[int]:
    """`newsletter serve` in a process of its own (two web processes and the worker); yields its port."""
    port = free_port()
    proc = subprocess.Popen(
        ["newsletter", "--config", str(config_file), "serve", "--port", str(port), "--processes", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: answering(port), timeout=30)
        yield port
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "Traceback" not in output, output


def answering(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


def ping(port: int, body: bytes = b'{"post": "new"}', **headers: str) -> requests.Response:
    signed = {SIGNATURE_HEADER: sign(SECRET, body, int(time.time()))}
    return requests.post(f"http://127.0.0.1:{port}/hooks/publish", data=body, headers=headers or signed, timeout=10)


def inbox(smtp: SMTPSink) -> Counter[str]:
    return Counter(r for m in smtp.messages for r in m.recipients)


def test_a_signed_ping_sends_the_new_post_within_seconds_and_once(server: int, feed: Path, smtp: SMTPSink) -> None:
    publish(feed, "Storm warning", "storm")
    assert ping(server).status_code == 202
    wait_for(lambda: len(smtp.messages) >= len(READERS), timeout=8)
    assert inbox(smtp) == Counter(READERS)
    assert all(m.message["Subject"] == "Storm warning" for m in smtp.messages)
    for _ in range(3):
        assert ping(server).status_code == 202
        time.sleep(1)
    time.sleep(3)
    assert inbox(smtp) == Counter(READERS)


def test_a_ping_not_signed_right_is_refused_and_sends_nothing(server: int, feed: Path, smtp: SMTPSink) -> None:
    publish(feed, "Storm warning", "storm")
    body = b'{"post": "new"}'
    now = int(time.time())
    refused = {
        "no signature": {},
        "another secret": {SIGNATURE_HEADER: sign("not-the-secret", body, now)},
        "garbled": {SIGNATURE_HEADER: "t=soon,v1=abc"},
        "stale": {SIGNATURE_HEADER: sign(SECRET, body, now - TOLERANCE - 60)},
        "from the future": {SIGNATURE_HEADER: sign(SECRET, body, now + TOLERANCE + 60)},
        "another body": {SIGNATURE_HEADER: sign(SECRET, b"{}", now)},
    }
    for what, headers in refused.items():
        answer = requests.post(
            f"http://127.0.0.1:{server}/hooks/publish", data=body, headers={"X-Test": what, **headers}, timeout=10
        )
        assert answer.status_code == 403, what
    time.sleep(5)
    assert smtp.messages == []
    signed = {SIGNATURE_HEADER: sign(SECRET, body, now)}
    assert ping(server, body, **signed).status_code == 202
    assert ping(server, body, **signed).status_code == 403  # the same ping again: a replay
    wait_for(lambda: len(smtp.messages) >= len(READERS), timeout=8)


def test_a_cron_send_at_the_same_time_never_doubles(server: int, feed: Path, smtp: SMTPSink, run) -> None:
    publish(feed, "Storm warning", "storm")
    assert ping(server).status_code == 202
    run("send")
    wait_for(lambda: len(smtp.messages) >= len(READERS), timeout=8)
    time.sleep(3)
    assert inbox(smtp) == Counter(READERS)


def test_the_hook_is_not_there_without_a_webhook_secret(nl: Newsletter) -> None:
    config = dataclasses.replace(nl.config, schedule=dataclasses.replace(nl.config.schedule, webhook_secret=""))
    client = create_app(Newsletter(config, nl.engine)).test_client()
    body = b"{}"
    answer = client.post("/hooks/publish", data=body, headers={SIGNATURE_HEADER: sign("", body, int(time.time()))})
    assert answer.status_code == 404


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def polling(nl: Newsletter, minutes: int) -> Newsletter:
    schedule = dataclasses.replace(nl.config.schedule, poll_minutes=minutes)
    return Newsletter(dataclasses.replace(nl.config, schedule=schedule), nl.engine)


def test_the_worker_polls_the_feed_every_poll_minutes(nl: Newsletter, readers, feed: Path, smtp: SMTPSink) -> None:
    clock = Clock()
    every_minute = polling(nl, 1)
    schedule = Schedule(every_minute, clock)
    assert run_due(every_minute, schedule) is not None  # at start
    publish(feed, "Storm warning", "storm")
    clock.now += 59
    assert run_due(every_minute, schedule) is None
    assert smtp.messages == []
    clock.now += 1
    report = run_due(every_minute, schedule)
    assert report is not None and report.sent == len(READERS)
    assert inbox(smtp) == Counter(READERS)


def test_polling_is_off_by_default(nl: Newsletter, readers, feed: Path, smtp: SMTPSink) -> None:
    clock = Clock()
    schedule = Schedule(nl, clock)
    publish(feed, "Storm warning", "storm")
    for _ in range(3):
        clock.now += 3600
        assert run_due(nl, schedule) is None
    assert smtp.messages == []


@pytest.mark.skipif(bool(POSTGRES_URL), reason="on PostgreSQL senders share the work instead")
def test_a_round_while_a_cron_send_runs_is_skipped_and_logged(
    nl: Newsletter, readers, feed: Path, smtp: SMTPSink, caplog: pytest.LogCaptureFixture
) -> None:
    every_minute = polling(nl, 1)
    schedule = Schedule(every_minute, Clock())
    publish(feed, "Storm warning", "storm")
    with caplog.at_level(logging.INFO, "newsletter.publish"), db.sender_lock(nl.engine):
        assert run_due(every_minute, schedule) is None
    assert "another `newsletter send` is running; skipped this round" in caplog.text
    assert smtp.messages == []


def test_a_feed_that_cannot_be_read_is_logged_and_the_worker_goes_on(
    nl: Newsletter, readers, feed: Path, smtp: SMTPSink, caplog: pytest.LogCaptureFixture
) -> None:
    every_minute = polling(nl, 1)
    clock = Clock()
    schedule = Schedule(every_minute, clock)
    feed.unlink()
    with caplog.at_level(logging.WARNING, "newsletter.publish"):
        assert run_due(every_minute, schedule) is None
    assert "poll: " in caplog.text and "nothing was sent" in caplog.text
