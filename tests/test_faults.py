"""`newsletter send` against misbehaving SMTP servers and hard crashes, checked at the server.

Every test runs the real command (in-process through click, or as its own process when it must be
killed) against a real aiosmtpd server whose handler is written for the fault, and counts what the
server stored, per recipient.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import random
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import bindparam, func, select, text, update

from newsletter.models import Delivery, DeliveryStatus, Status, Subscriber, UTCDateTime, utcnow

from .conftest import publish
from .test_mailer import Handler

SUMMARY = re.compile(r"(\d+) post\(s\): (\d+) sent, (\d+) failed, (\d+) skipped, (\d+) left for the next run")
MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]*>)", re.MULTILINE | re.IGNORECASE)


# ---- helpers ----------------------------------------------------------------------------------------


def configure(config_file: Path, **smtp: int) -> None:
    """Set [smtp] keys in the test's config file, replacing any it has."""
    lines, section = [], ""
    for line in config_file.read_text().splitlines():
        if line.strip().startswith("["):
            section = line.strip()
        elif section == "[smtp]" and line.split("=", 1)[0].strip() in smtp:
            continue
        lines.append(line)
        if line.strip() == "[smtp]":
            lines += [f"{key} = {value}" for key, value in smtp.items()]
    config_file.write_text("\n".join(lines) + "\n")


def add_readers(nl, count: int, prefix: str = "reader") -> list[str]:
    """COUNT confirmed subscribers PREFIX1@example.com ... in one set-based INSERT; returns their addresses."""
    address = f"'{prefix}' || n || '@example.com'"
    columns = "email, email_key, email_ascii, status, created_at, subscribed_at, confirmed_at"
    values = f"{address}, {address}, {address}, 'confirmed', :now, :now, :now"
    if nl.engine.dialect.name == "sqlite":
        sql = (
            f"INSERT INTO subscribers ({columns}) WITH RECURSIVE seq(n) AS "
            f"(SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < :count) SELECT {values} FROM seq"
        )
    else:
        sql = f"INSERT INTO subscribers ({columns}) SELECT {values} FROM generate_series(1, :count) AS n"
    statement = text(sql).bindparams(bindparam("now", type_=UTCDateTime()), bindparam("count"))
    with nl.engine.begin() as conn:
        conn.execute(statement, {"count": count, "now": datetime.now(UTC)})
        if nl.engine.dialect.name == "postgresql":
            conn.execute(text("ANALYZE subscribers"))
    return [f"{prefix}{n}@example.com" for n in range(1, count + 1)]


def new_post(run, feed: Path) -> None:
    """Take the feed as it is as already announced, then publish one new post for `send` to announce."""
    assert run("posts", "fetch").exit_code == 0
    publish(feed, "Storm warning", "storm")


def summary(output: str) -> dict[str, int]:
    match = SUMMARY.search(output)
    assert match, output
    posts, sent, failed, skipped, left = map(int, match.groups())
    return {"posts": posts, "sent": sent, "failed": failed, "skipped": skipped, "left": left}


def message_id(content: bytes) -> str:
    match = MESSAGE_ID.search(content)
    assert match, content[:400]
    return match.group(1).decode()


def delivery_rows(nl) -> dict[str, tuple[DeliveryStatus, str | None, Status]]:
    """address -> (delivery status, delivery error, subscriber status), for the one post being sent."""
    with nl.sessions() as session:
        rows = session.execute(
            select(Subscriber.email_key, Delivery.status, Delivery.error, Subscriber.status).join(
                Delivery, Delivery.subscriber_id == Subscriber.id
            )
        )
        return {address: (status, error, reader) for address, status, error, reader in rows}


def in_flight(nl) -> set[str]:
    """Recipients whose delivery is recorded as `sending` (claimed, outcome not yet recorded)."""
    with nl.sessions() as session:
        return set(
            session.scalars(
                select(Subscriber.email_key)
                .join(Delivery, Delivery.subscriber_id == Subscriber.id)
                .where(Delivery.status == DeliveryStatus.SENDING)
            )
        )


def count_sent(nl) -> int:
    with nl.sessions() as session:
        return (
            session.scalar(select(func.count()).select_from(Delivery).where(Delivery.status == DeliveryStatus.SENT))
            or 0
        )


@contextlib.contextmanager
def serving(handler: object, port: int) -> Iterator[None]:
    controller = Controller(handler, hostname="127.0.0.1", port=port, server_hostname="mx.test")
    controller.start()
    try:
        yield
    finally:
        controller.stop()


class Pipelining:
    """Handler mix-in: offer ESMTP PIPELINING in the EHLO reply, as tests/test_mailer.py's Handler does."""

    pipelining = True

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses


def settled(items: list, quiet: float = 0.3) -> None:
    """Wait until ITEMS has not grown for QUIET seconds."""
    while True:
        size = len(items)
        time.sleep(quiet)
        if len(items) == size:
            return


def send_process(config_file: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["newsletter", "--config", str(config_file), "send"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


# ---- 1. a hostile server --------------------------------------------------------------------------


class Hostile(Pipelining):
    """Refuses some transactions for a while, refuses some recipients for good, and hangs up now and then.

    MAIL: 1 % of sessions are dropped (closed with no reply), 3 % get 421 and are closed; drawn in arrival
    order from one seeded generator. RCPT: the REFUSED addresses get 550; otherwise 1 % are dropped and 7 %
    get 451, decided by a seeded hash of (address, attempt), so each try of an address has the same odds
    whatever the interleaving. Every drop happens before the transaction's content is read, and only once
    all earlier replies are on the wire, so a stored message always got its 250: "exactly once" is exact.
    """

    MAIL_DROP, MAIL_421 = 0.01, 0.03
    RCPT_DROP, RCPT_451 = 0.01, 0.07

    def __init__(self, refused: set[str], seed: int) -> None:
        self.refused, self.seed = refused, seed
        self.draws = random.Random(seed)
        self.tries: collections.Counter[str] = collections.Counter()
        self.faults: collections.Counter[str] = collections.Counter()
        self.stored: list[tuple[str, str]] = []

    @staticmethod
    def refusal(address: str) -> str:
        return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown in virtual mailbox table"

    async def _drop(self, server, kind: str) -> str:
        self.faults[kind] += 1
        transport = server.transport
        while transport.get_write_buffer_size():  # earlier replies (a 250 for stored content) go out first
            await asyncio.sleep(0.001)
        transport.close()  # with nothing left to write, anything answered from now on is discarded
        return "250 never seen by the client"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        draw = self.draws.random()
        if draw < self.MAIL_DROP:
            return await self._drop(server, "drop at MAIL")
        if draw < self.MAIL_DROP + self.MAIL_421:
            self.faults["421 at MAIL"] += 1
            asyncio.get_running_loop().call_soon(server.transport.close)
            return "421 4.3.2 mx.test Service shutting down, closing transmission channel"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refused:
            self.faults["550 at RCPT"] += 1
            return self.refusal(address)
        self.tries[address] += 1
        draw = random.Random(f"{self.seed}:{address}:{self.tries[address]}").random()
        if draw < self.RCPT_DROP:
            return await self._drop(server, "drop at RCPT")
        if draw < self.RCPT_DROP + self.RCPT_451:
            self.faults["451 at RCPT"] += 1
            return f"451 4.3.0 <{address}>: Temporary lookup failure, try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        for recipient in envelope.rcpt_tos:
            self.stored.append((recipient, message_id(envelope.content)))
        return f"250 2.0.0 Ok: queued as H{len(self.stored)}"


def test_hostile_server_every_deliverable_reader_gets_exactly_one_copy(run, nl, config_file, feed, smtp_port) -> None:
    started = time.monotonic()
    configure(config_file, connections=4, batch_size=20)
    readers = add_readers(nl, 600)
    refused = set(random.Random(5501).sample(readers, 15))
    new_post(run, feed)
    server = Hostile(refused, seed=20250401)
    runs = []
    with serving(server, smtp_port):
        for _ in range(4):
            result = run("send")
            assert result.exit_code == 0, result.output
            assert "possibly duplicated" not in result.output
            runs.append((summary(result.output), result.output))
            if runs[-1][0]["left"] == 0:
                break
    counts = [report for report, _ in runs]

    # Every fault happened, and the runs together finished the post.
    for kind in ("drop at MAIL", "421 at MAIL", "drop at RCPT", "451 at RCPT", "550 at RCPT"):
        assert server.faults[kind] > 0, server.faults
    assert counts[-1]["left"] == 0, counts
    assert "sending" not in run("posts", "list").output

    # At the server: one copy for each deliverable reader, none for a refused one, one Message-ID each.
    received = collections.Counter(recipient for recipient, _ in server.stored)
    deliverable = [r for r in readers if r not in refused]
    assert received == collections.Counter(deliverable)
    assert len({mid for _, mid in server.stored}) == len(deliverable)

    # In the ledger: refused readers failed with the server's own words and are bounced; the rest sent.
    rows = delivery_rows(nl)
    for address in refused:
        assert rows[address] == (DeliveryStatus.FAILED, Hostile.refusal(address), Status.BOUNCED)
    for address in deliverable:
        assert rows[address][0] == DeliveryStatus.SENT and rows[address][2] == Status.CONFIRMED
    failures = "".join(output for _, output in runs)
    for address in refused:
        assert f"failed: {address}: {Hostile.refusal(address)}" in failures

    # The summaries add up: each run accounts for everything the run before it left.
    expected = len(readers)
    for report in counts:
        assert report["sent"] + report["failed"] + report["skipped"] + report["left"] == expected, counts
        expected = report["left"]
    assert sum(r["sent"] for r in counts) == len(deliverable)
    assert sum(r["failed"] for r in counts) == len(refused)
    took = time.monotonic() - started
    print(f"\nhostile server: {len(counts)} run(s) {counts}, faults {dict(server.faults)}, {took:.1f} s")


# ---- 2. kill -9 at random moments -----------------------------------------------------------------


class Tally(Pipelining):
    """A fast sink: keeps only the recipient, the Message-ID and which sender run it came from."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[str, str, int]] = []
        self.run = 0
        self.target: int | None = None
        self.reached = threading.Event()

    async def handle_DATA(self, server, session, envelope):
        self.arrivals.append((envelope.rcpt_tos[0], message_id(envelope.content), self.run))
        if self.target is not None and len(self.arrivals) >= self.target:
            self.reached.set()
        return "250 2.0.0 Ok"


def test_kill_9_at_random_moments_misses_nobody_and_duplicates_only_in_flight_batches(
    run, nl, config_file, feed, smtp_port
) -> None:
    started = time.monotonic()
    connections, batch_size, total = 4, 50, 20_000
    bound = connections * batch_size
    configure(config_file, connections=connections, batch_size=batch_size)
    readers = add_readers(nl, total)
    new_post(run, feed)
    seeded = random.Random(9)
    # one kill in each fifth of the send, so every kill lands while messages flow
    kill_at = [seeded.randrange(total * k // 5 + 500, total * (k + 1) // 5 - 500) for k in range(4)]
    sink = Tally()
    inflight: list[set[str]] = []  # per kill: recipients recorded `sending` when the sender died
    with serving(sink, smtp_port):
        for threshold in kill_at:
            sink.target = threshold
            sink.reached.clear()
            process = send_process(config_file)
            try:
                assert sink.reached.wait(60), f"the sender never got to {threshold} messages"
            finally:
                process.kill()
                process.communicate(timeout=20)
            assert process.returncode == -9, "the sender ended before it was killed"
            settled(sink.arrivals)  # what the dead sender had written reaches the handler
            inflight.append(in_flight(nl))
            sink.run += 1
        sent_before_last = count_sent(nl)
        final = send_process(config_file)
        output, _ = final.communicate(timeout=120)
    assert final.returncode == 0, output

    copies: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    for recipient, mid, sender_run in sink.arrivals:
        copies[recipient].append((mid, sender_run))
    assert set(copies) == set(readers), "someone was never sent the post"
    assert count_sent(nl) == total

    duplicates_per_kill = [0] * len(kill_at)
    for recipient, seen in copies.items():
        assert len({mid for mid, _ in seen}) == 1, f"{recipient} got copies with different Message-IDs: {seen}"
        for _, sender_run in seen[1:]:
            # a second copy comes from the run after a kill, and only for a message in flight at that kill
            assert sender_run >= 1 and recipient in inflight[sender_run - 1], (recipient, seen)
            duplicates_per_kill[sender_run - 1] += 1
    for count, flying in zip(duplicates_per_kill, inflight, strict=True):
        assert len(flying) <= bound
        assert count <= bound
    assert sum(duplicates_per_kill) <= len(kill_at) * bound
    report = summary(output)
    assert report["sent"] == total - sent_before_last and report["left"] == 0
    if inflight[-1]:
        assert f"{len(inflight[-1])} possibly duplicated" in output
    took = time.monotonic() - started
    print(
        f"\nkill -9 at {kill_at}: in flight {[len(f) for f in inflight]}, "
        f"duplicates {duplicates_per_kill}, {len(sink.arrivals)} messages, {took:.1f} s"
    )


# ---- 3. max_per_second ----------------------------------------------------------------------------


class Clock(Pipelining):
    def __init__(self) -> None:
        self.arrivals: list[tuple[float, str]] = []

    async def handle_DATA(self, server, session, envelope):
        self.arrivals.append((time.monotonic(), envelope.rcpt_tos[0]))
        return "250 2.0.0 Ok"


@pytest.mark.parametrize("processes", [1, 2], ids=["threads", "child-processes"])
def test_max_per_second_is_the_rate_the_server_sees(run, nl, config_file, feed, smtp_port, processes) -> None:
    configure(config_file, connections=4, batch_size=20, max_per_second=200, processes=processes)
    readers = add_readers(nl, 2000)
    new_post(run, feed)
    sink = Clock()
    with serving(sink, smtp_port):
        result = run("send")
    assert result.exit_code == 0, result.output
    assert summary(result.output)["sent"] == 2000
    assert sorted(r for _, r in sink.arrivals) == sorted(readers)
    times = sorted(t for t, _ in sink.arrivals)
    rate = len(times) / (times[-1] - times[0])
    busiest = max(bisect.bisect_left(times, start + 1.0) - i for i, start in enumerate(times))
    print(f"\nmax_per_second = 200: measured {rate:.1f}/s over {times[-1] - times[0]:.2f} s; busiest second {busiest}")
    assert 180 <= rate <= 220
    # paced throughout, not in bursts: no second goes over the limit by more than one late batch per connection
    assert busiest <= 200 + 4 * 20


# ---- 4. max_per_day -------------------------------------------------------------------------------


class Keep(Pipelining):
    """Keeps (recipient, Message-ID) of every message; REFUSE_AT_DATA maps a recipient to an end-of-data refusal."""

    def __init__(self) -> None:
        self.stored: list[tuple[str, str]] = []
        self.refused: list[tuple[str, str]] = []
        self.refuse_at_rcpt: dict[str, str] = {}
        self.refuse_at_data: dict[str, str] = {}

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse_at_rcpt:
            return self.refuse_at_rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        recipient, mid = envelope.rcpt_tos[0], message_id(envelope.content)
        if recipient in self.refuse_at_data:
            self.refused.append((recipient, mid))
            return self.refuse_at_data[recipient]
        self.stored.append((recipient, mid))
        return "250 2.0.0 Ok"

    def copies(self) -> collections.Counter[str]:
        return collections.Counter(recipient for recipient, _ in self.stored)


def a_day_passes(nl) -> None:
    """Stand-in for tomorrow: what was sent so far was sent more than a day ago."""
    with nl.sessions.begin() as session:
        session.execute(
            update(Delivery)
            .where(Delivery.status == DeliveryStatus.SENT)
            .values(updated_at=utcnow() - timedelta(days=1, minutes=1))
        )


def test_max_per_day_spreads_a_send_over_days(run, nl, config_file, feed, smtp_port) -> None:
    configure(config_file, connections=4, batch_size=20, max_per_day=50)
    readers = add_readers(nl, 120)
    new_post(run, feed)
    sink = Keep()
    quota_note = "stopped at [smtp] max_per_day: the next run continues"
    with serving(sink, smtp_port):
        first = run("send")
        assert first.exit_code == 0, first.output
        assert summary(first.output)["sent"] == 50 and quota_note in first.output
        assert sum(sink.copies().values()) == 50

        again = run("send")  # the same day: the quota is used up
        assert again.exit_code == 0, again.output
        assert summary(again.output)["sent"] == 0 and quota_note in again.output
        assert sum(sink.copies().values()) == 50

        a_day_passes(nl)
        second_day = run("send")
        assert second_day.exit_code == 0 and summary(second_day.output)["sent"] == 50, second_day.output
        assert sum(sink.copies().values()) == 100
        assert summary(run("send").output)["sent"] == 0
        assert sum(sink.copies().values()) == 100

        a_day_passes(nl)
        third_day = run("send")
    assert third_day.exit_code == 0, third_day.output
    assert summary(third_day.output) == {"posts": 1, "sent": 20, "failed": 0, "skipped": 0, "left": 0}
    assert quota_note not in third_day.output
    assert sink.copies() == collections.Counter(readers)
    assert "sending" not in run("posts", "list").output


def test_max_per_day_used_up_by_the_last_message_does_not_hold_the_post_back(
    run, nl, config_file, feed, smtp_port
) -> None:
    """100 readers, a quota of 50: the second day's 50 finish the post, so that run neither says it stopped
    at the quota nor leaves the post unannounced (the quota ends exactly where the work does)."""
    configure(config_file, connections=4, batch_size=20, max_per_day=50)
    readers = add_readers(nl, 100)
    new_post(run, feed)
    sink = Keep()
    with serving(sink, smtp_port):
        assert summary(run("send").output)["sent"] == 50
        a_day_passes(nl)
        last = run("send")
    assert sink.copies() == collections.Counter(readers)
    assert summary(last.output)["sent"] == 50
    assert "stopped at [smtp] max_per_day" not in last.output, last.output
    assert "sending" not in run("posts", "list").output


# ---- 5. send --retry-failed -----------------------------------------------------------------------


def test_retry_failed_resends_with_the_same_message_id_and_confirms_the_reader_again(run, nl, feed, smtp_port) -> None:
    readers = add_readers(nl, 5)
    late, gone = readers[1], readers[3]
    new_post(run, feed)
    sink = Keep()
    sink.refuse_at_data[late] = "554 5.6.0 Message content rejected"
    sink.refuse_at_rcpt[gone] = f"550 5.1.1 <{gone}>: Recipient address rejected: User unknown"
    with serving(sink, smtp_port):
        first = run("send")
        assert first.exit_code == 0, first.output
        assert summary(first.output)["sent"] == 3 and summary(first.output)["failed"] == 2
        rows = delivery_rows(nl)
        assert rows[late] == (DeliveryStatus.FAILED, "554 5.6.0 Message content rejected", Status.CONFIRMED)
        assert rows[gone] == (DeliveryStatus.FAILED, sink.refuse_at_rcpt[gone], Status.BOUNCED)
        [(refused_to, refused_id)] = sink.refused
        assert refused_to == late

        sink.refuse_at_data.clear()
        sink.refuse_at_rcpt.clear()
        plain = run("send")  # without the flag a refusal stays final
        assert summary(plain.output)["sent"] == 0 and len(sink.stored) == 3

        retried = run("send", "--retry-failed")
    assert retried.exit_code == 0, retried.output
    assert "2 failed deliveries queued again" in retried.output
    assert summary(retried.output) == {"posts": 1, "sent": 2, "failed": 0, "skipped": 0, "left": 0}
    assert sink.copies() == collections.Counter(readers)
    assert dict(sink.stored)[late] == refused_id  # the same message, not a new one
    rows = delivery_rows(nl)
    assert rows[gone] == (DeliveryStatus.SENT, None, Status.CONFIRMED)
    assert rows[late] == (DeliveryStatus.SENT, None, Status.CONFIRMED)
    assert "sending" not in run("posts", "list").output


# ---- 6. with and without PIPELINING ---------------------------------------------------------------


class Watching(Handler):
    """tests/test_mailer.py's Handler, noting at each RCPT whether the client already sent the DATA after it."""

    def __init__(self, *, pipelining: bool) -> None:
        super().__init__(pipelining=pipelining)
        self.data_already_sent: list[bool] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        buffered = getattr(getattr(server, "_reader", None), "_buffer", None)
        if buffered is not None:
            self.data_already_sent.append(b"DATA\r\n" in bytes(buffered))
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


@pytest.mark.parametrize("pipelining", [False, True], ids=["plain", "pipelining"])
def test_with_and_without_pipelining_everyone_gets_one_copy(run, nl, config_file, feed, smtp_port, pipelining) -> None:
    configure(config_file, connections=4, batch_size=20)
    readers = add_readers(nl, 300)
    new_post(run, feed)
    server = Watching(pipelining=pipelining)
    with serving(server, smtp_port):
        result = run("send")
    assert result.exit_code == 0, result.output
    assert summary(result.output) == {"posts": 1, "sent": 300, "failed": 0, "skipped": 0, "left": 0}
    assert collections.Counter(server.delivered_to()) == collections.Counter(readers)
    assert len({message_id(content) for _, _, content, _ in server.messages}) == 300
    if server.data_already_sent:  # what the client wrote before it had the RCPT reply
        if pipelining:
            assert sum(server.data_already_sent) >= 0.9 * len(server.data_already_sent)
        else:
            assert not any(server.data_already_sent)
