#!/usr/bin/env python3
"""Benchmark `newsletter send` against Postfix's smtp-sink, with smtp-source as the yardstick.

    python bench/send.py                                   # 100,000 subscribers, SQLite and PostgreSQL
    python bench/send.py --sizes 10000 --database sqlite   # a quick run
    python bench/send.py --sizes 10000,100000,1000000      # linearity and memory over three sizes
    python bench/send.py --sizes 100000 --database sqlite --profile send-profile.txt
    python bench/send.py --kind daily --database sqlite    # only the daily digest

With --kind both (the default) every size and database is sent twice: as one instant notification to every
reader, and as the daily digest of the same post to every reader (the post waits for it, then `send`
makes the digests and sends them); the targets compare the two rates.

For each size and database: a fresh database (`newsletter db upgrade`), N confirmed subscribers made by one
set-based INSERT, a feed baseline (`newsletter posts fetch` on a one-item local feed) and one post with a
800-character summary (`newsletter posts add`; the email is then about 4.1 KB). The deliveries are
queued in this process with newsletter.dispatch.queue_posts (timed: that is the INSERT ... SELECT the
engine runs at the start of a send), then `newsletter send --no-fetch` runs as a user would run it, as
its own process, against smtp-sink on a free loopback port, with the default [smtp] connections.
Measured: wall time, messages counted by the sink and by the command's summary line (both must equal N)
and the peak RSS of the send process.
Just before and just after the send, smtp-source sends the same number of messages (at most --source-cap,
rate scaled) of the same rendered notification over the same number of connections to a fresh smtp-sink:
the mean of the two is the rate a C client reaches on this machine at that time.

Installs what is missing: Postfix (smtp-sink, smtp-source) and PostgreSQL with apt-get, psycopg and
py-spy (for --profile) with pip. Servers and temporary files are removed on exit and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchkit
from benchkit import BenchError, child_env, run_checked, start, stop_process

SUMMARY = re.compile(
    r"(\d+) post\(s\)(?:, \d+ digest\(s\))?: (\d+) sent, (\d+) failed, (\d+) skipped, (\d+) left for the next run"
)
DIGEST_DUE = '\n[digest]\nsend_hour = 0\ntimezone = "UTC"\n'  # every daily digest is due at once
SENDER = "news@bench.example"
FEED = """<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0"><channel>
<title>Bench Blog</title><link>https://blog.bench.example/</link><description>Benchmark feed</description>
<item><title>An older post</title><link>https://blog.bench.example/2025/01/older/</link>
<guid>https://blog.bench.example/2025/01/older/</guid><pubDate>Wed, 01 Jan 2025 10:00:00 +0000</pubDate>
<description>Already on the blog before the newsletter was installed.</description></item>
</channel></rss>
"""
SENTENCES = [
    "The morning ferry left the quay ten minutes late because the fog lay thick over the harbour mouth.",
    "Fishermen mended their nets on the slipway while gulls argued over what the night boats brought in.",
    "At the market the price of cod rose again, and the stallholders blamed the storms of the last week.",
    "The harbour master says the new pontoons will be ready before the summer visitors arrive in June.",
    "A small crowd gathered at the lifeboat station to watch the crew practise with the new inflatable.",
    "Down by the old warehouses the café has reopened with longer hours and a menu written on slate.",
]


def post_summary(size: int) -> str:
    """About SIZE characters of plain text in short paragraphs (the email carries it twice: text and HTML)."""
    paragraphs, text, i = [], "", 0
    while len(text) < size:
        paragraph = " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(3))
        paragraphs.append(paragraph)
        text = "\n\n".join(paragraphs)
        i += 1
    return text[:size].rsplit(" ", 1)[0] + "."


@dataclass
class Run:
    database: str
    n: int
    repeat: int
    kind: str = "instant"  # or "daily": every reader on the daily digest, the post waiting for it
    enqueue_s: float = 0.0
    send_s: float = 0.0
    send_cpu_s: float = 0.0
    sink_count: int = 0
    summary_sent: int = 0
    peak_rss_mb: float = 0.0
    base_rss_mb: float = 0.0
    source_messages: int = 0
    source_rates: list[float] = field(default_factory=list)
    message_bytes: int = 0
    profiled: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def send_rate(self) -> float:
        return self.n / self.send_s if self.send_s else 0.0

    @property
    def source_rate(self) -> float:
        """smtp-source's rate: the mean of its run just before and its run just after the send."""
        return statistics.fmean(self.source_rates) if self.source_rates else 0.0

    @property
    def ratio(self) -> float:
        return self.send_rate / self.source_rate if self.source_rate else 0.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- smtp-sink ------------------------------------------------------------------------------------


class Sink:
    """smtp-sink on a free loopback port, counting messages (-c) into a file."""

    def __init__(self, binary: str, folder: Path, name: str) -> None:
        self.port = benchkit.free_port()
        self.counter = folder / f"{name}-counter.txt"
        args = [binary]
        if benchkit.is_root():
            args += ["-u", "nobody"]
        args += ["-c", f"127.0.0.1:{self.port}", "1000"]
        self._out = open(self.counter, "wb")
        self._err_path = folder / f"{name}-stderr.txt"
        self._err = open(self._err_path, "wb")
        self.proc = start(args, stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL)
        try:
            benchkit.wait_for_port(self.port, self.proc, what="smtp-sink")
        except BenchError as exc:
            raise BenchError(f"{exc}: {self._err_path.read_text(errors='replace').strip()[-400:]}") from None

    def count(self) -> int:
        with open(self.counter, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 256))
            found = re.findall(rb"mesg=(\d+)", handle.read())
        return int(found[-1]) if found else 0

    def settled_count(self, expected: int, timeout: float = 10.0) -> int:
        deadline, last, stable_since = time.monotonic() + timeout, -1, time.monotonic()
        while time.monotonic() < deadline:
            value = self.count()
            if value >= expected:
                return value
            if value != last:
                last, stable_since = value, time.monotonic()
            elif time.monotonic() - stable_since > 1.0:
                return value
            time.sleep(0.05)
        return self.count()

    def stop(self) -> None:
        stop_process(self.proc)
        self._out.close()
        self._err.close()


# ---- one run --------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cmd = benchkit.newsletter_command()
        self.sink_bin, self.source_bin = benchkit.smtp_tools()
        self.pg: benchkit.PostgresCluster | None = None
        self.pyspy: str | None = None
        if args.profile:
            self.pyspy = benchkit.find_pyspy()

    def _smtp_source(self, result: Run, folder: Path, sample: Path, connections: int, label: str, when: str) -> None:
        """smtp-source sends the sample message over CONNECTIONS persistent sessions to a fresh smtp-sink."""
        sink = Sink(self.sink_bin, folder, f"source-{when}")
        count = result.source_messages
        log(
            f"{label}: smtp-source {when} the send: -s {connections} -m {count:,} ({result.message_bytes:,} bytes each)"
        )
        started = time.perf_counter()
        done = subprocess.run(
            [
                self.source_bin,
                "-s",
                str(connections),
                "-m",
                str(count),
                "-F",
                str(sample),
                "-f",
                SENDER,
                "-t",
                "reader@example.com",
                "-N",
                "-d",
                f"127.0.0.1:{sink.port}",
            ],
            capture_output=True,
            text=True,
            timeout=self.args.timeout,
        )
        seconds = time.perf_counter() - started
        counted = sink.settled_count(count)
        sink.stop()
        if done.returncode != 0 or counted != count:
            raise BenchError(
                f"smtp-source exit {done.returncode}, sink counted {counted} of {count}: {done.stderr.strip()[-400:]}"
            )
        result.source_rates.append(count / seconds)
        log(f"{label}: smtp-source {count / seconds:,.0f}/s")

    def postgres(self) -> benchkit.PostgresCluster:
        if self.pg is None:
            benchkit.need_python("psycopg", "psycopg[binary]")
            log("starting a throwaway PostgreSQL cluster")
            self.pg = benchkit.PostgresCluster()
            self.pg.start()
        return self.pg

    def run(self, database: str, n: int, repeat: int, kind: str) -> Run:
        result = Run(database, n, repeat, kind)
        folder = Path(benchkit.temp_dir(f"newsletter-bench-{database}-{n}-"))
        pg_name = f"bench_{n}_{repeat}_{os.getpid()}"
        try:
            if database == "sqlite":
                url = f"sqlite:///{folder / 'newsletter.db'}"
            else:
                url = self.postgres().create_database(pg_name)
            self._run(result, folder, url)
        finally:
            if database == "postgresql" and self.pg is not None:
                try:
                    self.pg.drop_database(pg_name)
                except Exception as exc:
                    log(f"could not drop {pg_name}: {exc}")
            shutil.rmtree(folder, ignore_errors=True)
        return result

    def _run(self, result: Run, folder: Path, url: str) -> None:
        n = result.n
        feed = folder / "feed.xml"
        feed.write_text(FEED, encoding="utf-8")
        extra = {
            key: value
            for key, value in (("connections", self.args.connections), ("batch_size", self.args.batch_size))
            if value
        }
        secret = secrets.token_urlsafe(32)
        sections = DIGEST_DUE if result.kind == "daily" else ""
        config = benchkit.write_config(folder / "config.toml", url, 25, feed, extra, secret, sections)
        newsletter = [*self.cmd, "--config", str(config)]

        label = f"{result.database} {result.kind} N={n:,}" + (f" (run {result.repeat})" if self.args.repeat > 1 else "")
        log(f"{label}: newsletter db upgrade")
        run_checked([*newsletter, "db", "upgrade"], "newsletter db upgrade")
        log(f"{label}: inserting {n:,} confirmed subscribers")
        took = insert_subscribers(url, n, result.kind)
        log(f"{label}: subscribers inserted in {took:.1f} s; posts fetch + posts add")
        run_checked([*newsletter, "posts", "fetch"], "newsletter posts fetch")
        run_checked(
            [
                *newsletter,
                "posts",
                "add",
                "--title",
                "Harbour news: the pontoons are in",
                "--url",
                "https://blog.bench.example/2025/04/pontoons/",
                "--summary",
                post_summary(self.args.summary_chars),
            ],
            "newsletter posts add",
        )

        sample = folder / "sample.eml"
        message = render_sample(newsletter)
        result.message_bytes = len(message)
        # smtp-source appends CRLF to each line of the file: give it LF line endings.
        sample.write_bytes(message.replace(b"\r\n", b"\n"))

        # The same command's footprint without sending: start-up, app, database, a count of the subscribers.
        result.base_rss_mb = peak_rss([*newsletter, "send", "--dry-run", "--no-fetch"], "newsletter send --dry-run")

        from newsletter import dispatch
        from newsletter.config import load_config
        from newsletter.runtime import Newsletter

        app_config = load_config(config, environ={})
        connections = app_config.smtp.connections
        limits = {k: v for k, v in vars(app_config.smtp).items() if k.startswith("max_per") and v}
        if limits:
            result.notes.append(f"rate limits in effect: {limits}")
        nl = Newsletter(app_config)
        try:
            log(f"{label}: queue_posts (the INSERT ... SELECT of {n:,} deliveries)")
            started = time.perf_counter()
            posts = dispatch.queue_posts(nl)
            result.enqueue_s = time.perf_counter() - started
            queued = count_deliveries(nl)
        finally:
            nl.engine.dispose()
        if len(posts) != 1 or queued != n:
            raise BenchError(f"queue_posts queued {len(posts)} post(s) and {queued} deliveries; expected 1 and {n}")

        result.source_messages = min(n, self.args.source_cap)
        if result.source_messages < n:
            result.notes.append(f"smtp-source capped at {result.source_messages:,} messages; its rate is per message")
        self._smtp_source(result, folder, sample, connections, label, "before")

        sink = Sink(self.sink_bin, folder, "send")
        benchkit.write_config(config, url, sink.port, feed, extra, secret, sections)
        log(
            f"{label}: newsletter send --no-fetch ({connections} connections, batch size "
            f"{app_config.smtp.batch_size}, sink on port {sink.port})"
        )
        out_path, err_path = folder / "send.out", folder / "send.err"
        command = [*newsletter, "send", "--no-fetch"]
        if self.pyspy:
            result.profiled = True
            command = [
                self.pyspy,
                "record",
                "--format",
                "raw",
                "--nolineno",
                "--rate",
                "200",
                *{"gil": ["--gil"], "wall": ["--idle"]}.get(self.args.profile_mode, []),
                "--output",
                str(Path(self.args.profile).resolve()),
                "--",
                *command,
            ]
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            started = time.perf_counter()
            proc = start(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=child_env())
            watchdog = threading.Timer(self.args.timeout, proc.kill)
            watchdog.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            finally:
                watchdog.cancel()
            result.send_s = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
            benchkit.forget(proc)
        result.peak_rss_mb = usage.ru_maxrss / 1024
        result.send_cpu_s = usage.ru_utime + usage.ru_stime
        result.sink_count = sink.settled_count(n)
        sink.stop()
        output = out_path.read_text(errors="replace")
        errors = err_path.read_text(errors="replace")
        if proc.returncode != 0:
            hint = " (killed after --timeout)" if proc.returncode < 0 else ""
            raise BenchError(
                f"newsletter send exited with status {proc.returncode}{hint}: "
                f"{(errors.strip() or output.strip())[-800:]}"
            )
        match = SUMMARY.search(output)
        if not match:
            raise BenchError(f"newsletter send printed no summary line: {output.strip()[-400:]!r}")
        result.summary_sent = int(match.group(2))
        for line in (output + errors).splitlines():
            if "queue" in line.lower() and not self.pyspy:
                result.notes.append(f"send said: {line.strip()}")
        if result.sink_count != n or result.summary_sent != n:
            raise BenchError(
                f"expected {n} messages; the sink counted {result.sink_count} and the command "
                f"reported {result.summary_sent} sent ({match.group(0)})"
            )
        log(
            f"{label}: sent {n:,} in {result.send_s:.1f} s ({result.send_rate:,.0f}/s), "
            f"peak RSS {result.peak_rss_mb:.1f} MB"
        )

        self._smtp_source(result, folder, sample, connections, label, "after")


def peak_rss(command: list[str], what: str) -> float:
    """Peak RSS in MB of COMMAND run to the end."""
    import tempfile

    with tempfile.TemporaryFile() as err:
        proc = start(command, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, env=child_env())
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        benchkit.forget(proc)
        if proc.returncode != 0:
            err.seek(0)
            raise BenchError(
                f"{what} exited with status {proc.returncode}: {err.read().decode(errors='replace').strip()[-400:]}"
            )
    return usage.ru_maxrss / 1024


def insert_subscribers(url: str, n: int, frequency: str) -> float:
    """N confirmed subscribers on FREQUENCY email in one set-based INSERT, with the columns
    `subscribers add --confirmed` writes."""
    from sqlalchemy import bindparam, text

    from newsletter.db import make_engine
    from newsletter.models import UTCDateTime

    engine = make_engine(url)
    columns = (
        "email, email_key, email_ascii, status, created_at, subscribed_at, subscribed_user_agent, "
        "confirmed_at, confirmed_user_agent, frequency"
    )
    values = (
        "'Reader' || n || '@example.com', 'reader' || n || '@example.com', 'Reader' || n || '@example.com', "
        "'confirmed', :now, :now, 'newsletter command line', :now, 'newsletter command line', :frequency"
    )
    if engine.dialect.name == "sqlite":
        sql = (
            f"INSERT INTO subscribers ({columns}) WITH RECURSIVE seq(n) AS "
            f"(SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < :n) SELECT {values} FROM seq"
        )
    else:
        sql = f"INSERT INTO subscribers ({columns}) SELECT {values} FROM generate_series(1, :n) AS n"
    statement = text(sql).bindparams(bindparam("now", type_=UTCDateTime()), bindparam("n"), bindparam("frequency"))
    started = time.perf_counter()
    try:
        with engine.begin() as conn:
            conn.execute(statement, {"n": n, "now": datetime.now(UTC), "frequency": frequency})
            if engine.dialect.name == "postgresql":
                conn.execute(text("ANALYZE subscribers"))
            count = conn.execute(text("SELECT count(*) FROM subscribers WHERE status = 'confirmed'")).scalar()
    finally:
        engine.dispose()
    if count != n:
        raise BenchError(f"inserted {count} subscribers, expected {n}")
    return time.perf_counter() - started


def count_deliveries(nl) -> int:
    from sqlalchemy import func, select

    from newsletter.models import Delivery

    with nl.sessions() as session:
        return session.scalar(select(func.count()).select_from(Delivery)) or 0


def render_sample(newsletter: list[str]) -> bytes:
    """One notification exactly as `newsletter send --to` renders it, caught by an in-process aiosmtpd."""
    from aiosmtpd.controller import Controller

    caught: list[bytes] = []

    class Catcher:
        async def handle_DATA(self, server, session, envelope):
            caught.append(envelope.original_content)
            return "250 OK"

    port = benchkit.free_port()
    controller = Controller(Catcher(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        run_checked(
            [*newsletter, "send", "--to", "reader1@example.com"],
            "newsletter send --to",
            env=child_env(NEWSLETTER_SMTP__PORT=str(port)),
        )
    finally:
        controller.stop()
    if len(caught) != 1:
        raise BenchError(f"expected one sample message from `newsletter send --to`, caught {len(caught)}")
    message = caught[0]
    if b"\r\n" not in message:
        message = message.replace(b"\n", b"\r\n")
    return message


# ---- report ---------------------------------------------------------------------------------------


def report(runs: list[Run]) -> None:
    print()
    header = (
        f"{'database':<10} {'email':<7} {'N':>9} {'enqueue s':>9} {'send s':>8} {'send msg/s':>10} "
        f"{'source msg/s':>12} {'ratio':>6} {'peak RSS MB':>11} {'send CPU s':>10} {'base RSS MB':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in runs:
        flag = "  (profiled)" if r.profiled else ""
        print(
            f"{r.database:<10} {r.kind:<7} {r.n:>9,} {r.enqueue_s:>9.2f} {r.send_s:>8.1f} {r.send_rate:>10,.0f} "
            f"{r.source_rate:>12,.0f} {r.ratio:>6.2f} {r.peak_rss_mb:>11.1f} {r.send_cpu_s:>10.1f} "
            f"{r.base_rss_mb:>11.1f}{flag}"
        )
    sizes = sorted({r.message_bytes for r in runs})
    size = f"{sizes[0]:,}" if len(sizes) == 1 else f"{sizes[0]:,}-{sizes[-1]:,}"
    print(
        f"\nmessage size {size} bytes; the sink and the command's summary both counted N for every send; "
        f"smtp-source used the same connections (-s) over persistent sessions (-d)"
    )
    print(
        "source msg/s: mean of smtp-source just before and just after the send ("
        + "; ".join(f"{r.database} {r.n:,}: {' / '.join(f'{x:,.0f}' for x in r.source_rates)}" for r in runs)
        + ")"
    )
    print(
        "send CPU s: user + system CPU of the send process and its child processes; peak RSS MB: the largest of "
        "theirs (children share most of their memory with the parent); base RSS MB: peak RSS of "
        "`newsletter send --dry-run` on the same database (start-up footprint)"
    )
    notes = sorted({note for r in runs for note in r.notes})
    for note in notes:
        print(f"note: {note}")

    kind = "instant" if any(r.kind == "instant" for r in runs) else "daily"
    print(f"\nlinearity ({kind}, median of repeats):")
    for database in dict.fromkeys(r.database for r in runs):
        by_size: dict[int, list[Run]] = {}
        for r in runs:
            if r.database == database and r.kind == kind:
                by_size.setdefault(r.n, []).append(r)
        for n in sorted(by_size):
            group = by_size[n]
            send_us = statistics.median(r.send_s / r.n for r in group) * 1e6
            enq_us = statistics.median(r.enqueue_s / r.n for r in group) * 1e6
            rss = statistics.median(r.peak_rss_mb for r in group)
            print(
                f"  {database:<10} N={n:>9,}: send {send_us:7.1f} µs/message, enqueue {enq_us:6.2f} µs/row, "
                f"peak RSS {rss:6.1f} MB"
            )
        if len(by_size) > 1:
            small, large = min(by_size), max(by_size)
            rss_small = statistics.median(r.peak_rss_mb for r in by_size[small])
            rss_large = statistics.median(r.peak_rss_mb for r in by_size[large])
            print(f"  {database:<10} peak RSS at N={large:,} / N={small:,}: {rss_large / rss_small:.2f}x")

    print("\ntargets:")
    groups: dict[tuple[str, str, int], list[Run]] = {}
    for r in runs:
        if not r.profiled:
            groups.setdefault((r.database, r.kind, r.n), []).append(r)
    for (database, kind, n), group in groups.items():
        ratio = statistics.median(r.ratio for r in group)
        verdict = "ok" if ratio >= 0.9 else "ok (below the 0.9 aim)" if ratio >= 0.8 else "MISSED"
        each = f" (runs: {', '.join(f'{r.ratio:.2f}' for r in group)})" if len(group) > 1 else ""
        print(
            f"  {database} {kind} N={n:,}: send rate {ratio:.2f}x smtp-source{each}, median (target >= 0.8, "
            f"aim 0.9): {verdict}"
        )
    for database in dict.fromkeys(r.database for r in runs):
        for n in sorted({r.n for r in runs}):
            rates = {
                kind: statistics.median(r.send_rate for r in group)
                for kind in ("instant", "daily")
                if (group := [r for r in runs if (r.database, r.n, r.kind) == (database, n, kind) and not r.profiled])
            }
            if len(rates) == 2:
                ratio = rates["daily"] / rates["instant"]
                verdict = "ok" if ratio >= 0.8 else "MISSED"
                print(
                    f"  {database} N={n:,}: daily digest {rates['daily']:,.0f} msg/s = {ratio:.2f}x the instant "
                    f"notification's {rates['instant']:,.0f} msg/s (target >= 0.8): {verdict}"
                )
    for database in dict.fromkeys(r.database for r in runs):
        group = [r for r in runs if r.database == database and not r.profiled]
        million = [r for r in group if r.n >= 1_000_000]
        small = [r for r in group if r.n <= 10_000]
        for r in million:
            print(
                f"  {database} N={r.n:,}: enqueue {r.enqueue_s:.1f} s (target < 10 s): "
                f"{'ok' if r.enqueue_s < 10 else 'MISSED'}"
            )
            print(
                f"  {database} N={r.n:,}: peak RSS {r.peak_rss_mb:.1f} MB (target < 100 MB): "
                f"{'ok' if r.peak_rss_mb < 100 else 'MISSED'}"
            )
        if million and small:
            ratio = statistics.median(r.peak_rss_mb for r in million) / statistics.median(r.peak_rss_mb for r in small)
            print(
                f"  {database}: peak RSS 1M / 10k = {ratio:.2f}x (target <= 1.25x): "
                f"{'ok' if ratio <= 1.25 else 'MISSED'}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subscribers", type=int, metavar="N", help="one size (same as --sizes N)")
    parser.add_argument("--sizes", default="100000", help="comma-separated subscriber counts (default 100000)")
    parser.add_argument("--database", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each size and database (default 1)")
    parser.add_argument(
        "--kind",
        choices=("instant", "daily", "both"),
        default="both",
        help="instant: one notification per reader; daily: every reader on the daily digest; both (default), "
        "alternating, with the ratio of their rates",
    )
    parser.add_argument(
        "--connections", type=int, default=0, help="[smtp] connections to set (default: leave the app's default)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=0, help="[smtp] batch_size to set (default: leave the app's default)"
    )
    parser.add_argument(
        "--source-cap",
        type=int,
        default=200_000,
        help="most messages smtp-source sends; its rate is per message (default 200000)",
    )
    parser.add_argument(
        "--profile-mode",
        choices=("gil", "active", "wall"),
        default="gil",
        help="gil: only the thread holding the GIL (where the CPU goes; default); "
        "active: every thread that py-spy sees running; wall: every thread, waiting or not "
        "(a thread's time waiting for a lock shows as the caller's own time)",
    )
    parser.add_argument(
        "--summary-chars",
        type=int,
        default=800,
        help="characters of plain text in the post's summary (default 800: an email of about 4 KB)",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a send is killed")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="record the send with py-spy into FILE (collapsed stacks) and print the top functions",
    )
    args = parser.parse_args()
    try:
        sizes = [args.subscribers] if args.subscribers else [int(s.replace("_", "")) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes must be comma-separated whole numbers, not {args.sizes!r}")
    if any(n < 1 for n in sizes) or args.repeat < 1:
        parser.error("sizes and --repeat must be at least 1")
    databases = ["sqlite", "postgresql"] if args.database == "both" else [args.database]
    kinds = ["instant", "daily"] if args.kind == "both" else [args.kind]

    benchkit.install_cleanup()
    runs: list[Run] = []
    try:
        bench = Bench(args)
        for database in databases:
            for n in sizes:
                for repeat in range(1, args.repeat + 1):
                    for kind in kinds:
                        runs.append(bench.run(database, n, repeat, kind))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if runs:
            report(runs)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped and temporary files removed", file=sys.stderr)
        if runs:
            report(runs)
        return 130
    finally:
        benchkit.cleanup()
    report(runs)
    if args.profile:
        print(f"\nprofile of the send ({args.profile}):")
        print(benchkit.summarize_profile(Path(args.profile), args.profile_mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
