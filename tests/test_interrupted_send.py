"""A send that is cut short (SMTP failing, Ctrl-C, kill -9) and run again reaches everyone once."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import update

from newsletter import threads
from newsletter.models import SUBSCRIBERS

from .conftest import SMTPSink, children, serving, wait_for


def copies(*sinks: SMTPSink) -> collections.Counter[str]:
    return collections.Counter(r for sink in sinks for m in sink.messages for r in m.recipients)


class Failing(SMTPSink):
    """Accepts LIMIT messages, then answers 421 to everything."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.tripped = threading.Event()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if len(self.messages) >= self.limit:
            self.tripped.set()
            return "421 4.3.2 Service shutting down"
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


def test_smtp_failing_midway_then_rerun(readers, run, smtp_port) -> None:
    failing = Failing(limit=45)
    controller = Controller(failing, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    stopper = threading.Thread(target=lambda: (failing.tripped.wait(10), controller.stop()))
    stopper.start()
    first = run("send")
    stopper.join()
    assert first.exit_code == 1
    assert "stopped: SMTP server" in first.output and "sent" in first.output
    assert 45 <= len(failing.messages) < len(readers)

    with serving(SMTPSink(), smtp_port) as healthy:
        second = run("send")
    assert second.exit_code == 0, second.output
    assert copies(failing, healthy) == collections.Counter(readers)
    assert "possibly duplicated" not in second.output


class Slow(SMTPSink):
    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(0.01)
        return await super().handle_DATA(server, session, envelope)


def send_process(config_file: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["newsletter", "--config", str(config_file), "send"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


IN_PROCESS, FORKED = "processes = 1\n", "processes = 2\n"  # the send's own threads write, or child processes


@pytest.mark.parametrize("extra_config", [IN_PROCESS, FORKED], ids=["threads", "child-processes"])
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stopped_midway_then_rerun_sends_everyone_exactly_once(
    readers, run, config_file, smtp_port, stop: signal.Signals
) -> None:
    """Ctrl-C, and SIGTERM as systemd, docker stop and timeout send it: the batches on the wire are finished
    and recorded, the summary is printed, and the exit status is 128 + the signal. Child processes that
    write (signalled too, as a terminal's Ctrl-C and systemd do) finish their batches for the send."""
    with serving(Slow(), smtp_port) as sink:
        process = send_process(config_file)
        wait_for(lambda: len(sink.messages) >= 30, timeout=20)
        for pid in [process.pid, *children(process.pid)]:
            os.kill(pid, stop)
        output, _ = process.communicate(timeout=20)
        assert process.returncode == 128 + stop, output
        assert "interrupted: what was sent is recorded" in output and "Traceback" not in output
        sent = int(output.split(" sent,")[0].split()[-1])
        assert sent == len(sink.messages)  # every message that went out was recorded as sent
        interrupted_at = len(sink.messages)
        assert interrupted_at < len(readers)
        rerun = run("send")
        assert rerun.exit_code == 0, rerun.output
    assert copies(sink) == collections.Counter(readers)


@pytest.mark.parametrize(
    "extra_config, frequency, subject",
    [
        (IN_PROCESS, "instant", "Storm warning"),
        (FORKED, "instant", "Storm warning"),
        (IN_PROCESS + "[digest]\nsend_hour = 0\n", "daily", "Daily digest from Harbour Notes: Storm warning"),
        (FORKED + "[digest]\nsend_hour = 0\n", "daily", "Daily digest from Harbour Notes: Storm warning"),
    ],
    ids=["notification-threads", "notification-child-processes", "digest-threads", "digest-child-processes"],
)
def test_kill_9_midway_then_rerun_misses_nobody(
    readers, nl, run, config_file, smtp_port, frequency: str, subject: str
) -> None:
    """Notifications and digests share the ledger: after kill -9 only the batches in flight may repeat."""
    with nl.engine.begin() as conn:
        conn.execute(update(SUBSCRIBERS).values(frequency=frequency))
    with serving(Slow(), smtp_port) as sink:
        process = send_process(config_file)
        wait_for(lambda: len(sink.messages) >= 30, timeout=20)
        process.kill()
        process.communicate(timeout=20)  # child processes hold its output open: they are gone too
        rerun = run("send")
        assert rerun.exit_code == 0, rerun.output
    received = copies(sink)
    assert set(received) == set(readers)
    assert {m.message["Subject"] for m in sink.messages} == {subject}
    duplicated = sum(n - 1 for n in received.values())
    assert duplicated <= 2 * 10  # in flight at the kill: at most one batch (10) on each of 2 connections
    if duplicated:
        assert "possibly duplicated" in rerun.output


def test_waiting_for_a_connection_survives_the_stop_signal() -> None:
    """The summary waits for every connection's batch even when Ctrl-C lands while it waits (with
    Thread.join, Python 3.11 forgets the thread it was waiting for and prints a summary too early)."""
    gate, recorded = threading.Event(), []
    finished = threads.start(lambda: (gate.wait(), recorded.append("batch")), "smtp-0")
    main = threading.main_thread().ident
    assert main is not None
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            threads.wait([finished])
        threading.Timer(0.3, gate.set).start()
        threads.wait([finished])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert recorded == ["batch"]
