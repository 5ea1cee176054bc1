"""A large send rendered and written by child processes ([smtp] processes): every reader gets their own
email once, with their own links; a child that dies loses nobody."""

from __future__ import annotations

import collections
import os
import signal
from datetime import timedelta

import pytest
from sqlalchemy import select

from newsletter import db, dispatch, roster
from newsletter.models import Post, Subscriber, utcnow
from newsletter.runtime import Newsletter

from .conftest import SMTPSink, children, serving, wait_for
from .test_digests import choose
from .test_interrupted_send import FORKED, Slow, copies, send_process


class Watching(SMTPSink):
    """Notes which child processes of the test's own process were running as each message arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: list[set[int]] = []

    async def handle_DATA(self, server, session, envelope):
        self.writers.append(children(os.getpid()))
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def extra_config() -> str:
    return FORKED + "[digest]\nsend_hour = 0\n"


def post(nl: Newsletter, title: str) -> None:
    with nl.sessions.begin() as session:
        session.add(Post(guid=title, url=f"https://blog.example/{title}/", title=title, published_at=utcnow()))


def test_a_large_send_is_written_by_child_processes_each_reader_once_with_their_own_links(
    nl: Newsletter, smtp_port: int
) -> None:
    instant = [f"instant{i:02d}@example.com" for i in range(30)]
    early = [f"early{i:02d}@example.com" for i in range(15)]  # daily, there for both posts
    late = [f"late{i:02d}@example.com" for i in range(15)]  # daily, joined after the first was queued
    for address in [*instant, *early]:
        roster.add_subscriber(nl, address, confirmed=True)
    for address in early:
        choose(nl, address, "daily")
    post(nl, "First")
    dispatch.queue_posts(nl)
    for address in late:
        roster.add_subscriber(nl, address, confirmed=True)
        choose(nl, address, "daily")
    post(nl, "Second")

    with serving(Watching(), smtp_port) as sink, db.sender_lock(nl.engine) as sender_id:
        report = dispatch.send(nl, sender_id, now=utcnow() + timedelta(days=1))

    assert (report.sent, report.failed, report.deferred, report.error) == (90, 0, 0, None)
    assert all(len(running) == 2 for running in sink.writers)  # the two children, and only they, were writing
    assert children(os.getpid()) == set()  # each pass's children are gone once it ends
    expected = {
        **{address: ["First", "Second"] for address in instant},
        **{address: ["Daily digest from Harbour Notes: First and 1 more"] for address in early},
        **{address: ["Daily digest from Harbour Notes: Second"] for address in late},
    }
    assert {address: sorted(sink.subjects(address)) for address in expected} == expected
    with nl.sessions() as session:
        ids = {key: id_ for key, id_ in session.execute(select(Subscriber.email_key, Subscriber.id))}
    for message in sink.messages:
        (recipient,) = message.recipients
        unsubscribe = str(message.message["List-Unsubscribe"]).strip("<>")
        assert unsubscribe == nl.unsubscribe_url(ids[recipient])
        assert nl.manage_url(ids[recipient]) in message.text


def test_a_sending_process_killed_mid_batch_leaves_no_reader_behind(readers, run, config_file, smtp_port) -> None:
    """Its batch may have gone out: it is counted as possibly duplicated and sent again by the next run."""
    with serving(Slow(), smtp_port) as sink:
        process = send_process(config_file)
        wait_for(lambda: len(sink.messages) >= 25, timeout=20)
        victim = min(children(process.pid))
        os.kill(victim, signal.SIGKILL)
        output, _ = process.communicate(timeout=20)
        assert process.returncode == 1, output
        assert f"a sending process ended unexpectedly (exit code -{signal.SIGKILL})" in output, output
        assert "possibly duplicated" in output and "Traceback" not in output
        rerun = run("send")
        assert rerun.exit_code == 0, rerun.output
    received = copies(sink)
    assert set(received) == set(readers)
    assert sum(n - 1 for n in received.values()) <= 10  # at most the killed child's batch
    assert collections.Counter(received.values()).keys() <= {1, 2}
