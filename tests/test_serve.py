"""`newsletter serve` with several web processes: every sign-up is recorded and confirmed once, a web process
that dies is replaced, and Ctrl-C or SIGTERM stops them all."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from aiosmtpd.controller import Controller
from sqlalchemy import func, select, text

from newsletter.models import OUTBOX, Signup
from newsletter.signups import forget_old, process_signups
from newsletter.worker import run_worker

from .conftest import POSTGRES_URL, SMTPSink, form_data, free_port, wait_for


@pytest.fixture
def extra_config() -> str:
    return '[web]\nrate_limit = "1000 per hour"\nsignup_ceiling = 1000\nnetwork_ceiling = 1000\n'


def children(pid: int) -> list[int]:
    found = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(line) for line in found.split()]


def answering(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


@pytest.fixture
def server(config_file: Path, app) -> Iterator[tuple[subprocess.Popen, int]]:
    port = free_port()
    proc = subprocess.Popen(
        [
            "newsletter",
            "--config",
            str(config_file),
            "serve",
            "--port",
            str(port),
            "--processes",
            "2",
            "--threads",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: answering(port), timeout=30)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.communicate(timeout=20)


def test_two_web_processes_record_every_signup_once(server, nl, smtp) -> None:
    proc, port = server
    assert len(children(proc.pid)) == 3  # two web processes and the worker
    readers = [f"reader{i}@example.com" for i in range(40)]
    answers: list[int] = []
    barrier = threading.Barrier(len(readers))

    def sign_up(address: str) -> None:
        barrier.wait()
        answers.append(
            requests.post(f"http://127.0.0.1:{port}/subscribe", data=form_data(nl, address), timeout=30).status_code
        )

    threads = [threading.Thread(target=sign_up, args=(address,)) for address in readers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [200] * len(readers)
    wait_for(lambda: len(smtp.messages) >= len(readers), timeout=30)
    assert Counter(m.recipients[0] for m in smtp.messages) == Counter(readers)


def test_a_web_process_that_dies_is_replaced(server) -> None:
    proc, port = server
    before = children(proc.pid)
    os.kill(before[0], signal.SIGKILL)
    wait_for(lambda: len(children(proc.pid)) == 3 and before[0] not in children(proc.pid), timeout=20)
    assert all(answering(port) for _ in range(10))


def test_web_processes_end_when_the_server_is_killed(server) -> None:
    proc, port = server
    workers = children(proc.pid)
    proc.kill()
    proc.wait(timeout=10)
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout=10)
    assert not answering(port)


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_every_process(server, how: signal.Signals) -> None:
    proc, port = server
    workers = children(proc.pid)
    proc.send_signal(how)
    output, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "Traceback" not in output
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert not answering(port)


SERVE_FORKED = """
import sys
from newsletter.serving import listen, serve_forked
sock = listen("127.0.0.1", 0)
print(sock.getsockname()[1], flush=True)
serve_forked(lambda environ, start_response: [], sock, processes=3, threads=1)
"""


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.003, 0.01, 0.03])
def test_a_stop_signal_during_start_up_still_stops_every_process(delay: float) -> None:
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", SERVE_FORKED], stdout=subprocess.PIPE, text=True)
        port = int(proc.stdout.readline())  # the parent is about to fork its children
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) in (0, -signal.SIGTERM)  # before the first fork, SIGTERM simply ends it
        wait_for(lambda port=port: refused(port), timeout=5)


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_the_worker_stops_cleanly_on_ctrl_c_or_sigterm(site, smtp, config_file: Path, how: signal.Signals) -> None:
    worker = subprocess.Popen(
        ["newsletter", "--config", str(config_file), "worker"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    site.subscribe("reader@example.com")
    wait_for(lambda: smtp.to("reader@example.com"), timeout=20)  # the worker is up and working
    worker.send_signal(how)
    output, _ = worker.communicate(timeout=20)
    assert worker.returncode == 0 and "Traceback" not in output, output


class SlowSink(SMTPSink):
    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(0.05)
        return await super().handle_DATA(server, session, envelope)


@pytest.mark.parametrize(
    ("command", "how"),
    [
        (["worker"], signal.SIGTERM),
        (["worker"], signal.SIGINT),
        (["serve", "--processes", "2"], signal.SIGTERM),
        (["serve", "--processes", "1"], signal.SIGTERM),
    ],
    ids=["worker-sigterm", "worker-ctrl-c", "serve-sigterm", "serve-one-process-sigterm"],
)
def test_confirmations_on_the_wire_when_stopped_are_recorded_and_never_sent_twice(
    site, config_file: Path, smtp_port: int, run, command: list[str], how: signal.Signals
) -> None:
    readers = [f"reader{i:03d}@example.com" for i in range(100)]
    for address in readers:
        assert site.subscribe(address).status_code == 200
    assert site.record_signups() == len(readers)
    sink = SlowSink()
    controller = Controller(sink, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    try:
        if command[0] == "serve":
            command = [*command, "--port", str(free_port())]
        proc = subprocess.Popen(
            ["newsletter", "--config", str(config_file), *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for(lambda: len(sink.messages) >= 10, timeout=30)
        proc.send_signal(how)
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "Traceback" not in output, output
        with site.nl.engine.connect() as conn:
            assert conn.scalar(select(func.count()).where(OUTBOX.c.sent_at.is_not(None))) == len(sink.messages)
        assert len(sink.messages) < len(readers)
        run("worker", "--once")  # at once: nothing is left leased to a worker that is gone
    finally:
        controller.stop()
    assert sorted(m.recipients[0] for m in sink.messages) == readers


def test_old_processed_signups_are_forgotten_but_new_ones_never(site, nl, run) -> None:
    for i in range(3):
        assert site.subscribe(f"reader{i}@example.com").status_code == 200
    assert "sign-ups waiting for the worker: 3" in run("stats").output
    with nl.engine.begin() as conn:  # two of them arrived two hours ago, before the window of the rate limit
        conn.execute(Signup.__table__.update().where(Signup.id <= 2).values(received_at=Signup.received_at - 7200))
    forget_old(nl)
    assert count_log(nl) == 3  # not yet recorded: kept whatever their age
    assert process_signups(nl) == 3
    forget_old(nl)
    assert count_log(nl) == 1
    assert "sign-ups waiting for the worker: 0" in run("stats").output


def count_log(nl) -> int:
    with nl.sessions() as session:
        return session.scalar(select(func.count()).select_from(Signup))


@pytest.mark.skipif(not POSTGRES_URL, reason="a server that drops connections: PostgreSQL")
def test_a_sign_up_survives_the_database_dropping_its_connection(site, nl) -> None:
    assert site.subscribe("before@example.com").status_code == 200
    with nl.engine.connect() as conn:  # as a restart of the database server does
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    assert site.subscribe("after@example.com").status_code == 200
    assert count_log(nl) == 2


def test_a_stop_signal_a_database_driver_turned_into_its_own_error_still_stops_the_worker(
    nl, monkeypatch, caplog
) -> None:
    """SIGTERM in the middle of a statement can come out of psycopg as another error (raised while the
    pool cleans up after the KeyboardInterrupt): the worker stops quietly, as on the signal itself. Any
    other error is logged and the worker goes on."""
    calls = []

    def interrupted_statement(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a driver's own error, not about a stop")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("can't change 'autocommit' now: connection in transaction status ACTIVE") from None

    monkeypatch.setattr("newsletter.worker.work_once", interrupted_statement)
    stop = threading.Event()
    finished = threading.Event()
    thread = threading.Thread(target=lambda: (run_worker(nl, stop, 0.01), finished.set()))
    thread.start()
    thread.join(timeout=10)
    stop.set()
    assert finished.is_set() and len(calls) == 2
    failures = [r for r in caplog.records if "worker: failed" in r.getMessage()]
    assert len(failures) == 1 and "not about a stop" in str(failures[0].exc_info[1])
