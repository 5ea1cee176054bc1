"""`newsletter subscribers import` of a large file: committed in chunks while the sign-up form keeps
answering, a summary line with counts, progress on a terminal, and an interrupted import finished by a rerun."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select

from newsletter.models import Status, Subscriber

from .conftest import wait_for

BIG = 100_000


@pytest.fixture
def extra_config() -> str:
    return '[web]\nrate_limit = "1000 per hour"\n'  # the test's sign-ups all come from 127.0.0.1


def readers_file(path: Path, rows: int) -> Path:
    path.write_text("email\n" + "".join(f"reader{i:06d}@example.com\n" for i in range(rows)), encoding="utf-8")
    return path


Start = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def newsletter(config_file: Path) -> Iterator[Start]:
    """Start the installed `newsletter` command in its own process, with no NEWSLETTER_* settings from this
    shell; one still running when the test ends is killed."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, stderr: int = subprocess.PIPE) -> subprocess.Popen[str]:
        command = ["newsletter", "--config", str(config_file), *args]
        started.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=environ))
        return started[-1]

    yield start
    for process in started:
        process.kill()
        process.communicate()


def subscribers(nl) -> int:
    with nl.sessions() as session:
        return session.scalar(select(func.count()).select_from(Subscriber)) or 0


def status_of(nl, address: str) -> Status:
    with nl.sessions() as session:
        return session.scalars(select(Subscriber.status).where(Subscriber.email_key == address)).one()


@dataclass
class SignUp:
    before: int  # subscribers when the form was sent
    status: int
    seconds: float
    after: int  # subscribers when its page had come back


def test_sign_ups_during_an_import_of_100000_rows_all_succeed(site, newsletter: Start, tmp_path: Path) -> None:
    """The import commits a thousand rows at a time, so a sign-up waits for one chunk at most, never for the
    whole import (SQLite has one writer at a time)."""
    big = readers_file(tmp_path / "readers.csv", BIG)
    process = newsletter("subscribers", "import", str(big))
    sign_ups: list[SignUp] = []
    while process.poll() is None:
        before, started = subscribers(site.nl), time.monotonic()
        response = site.subscribe(f"web{len(sign_ups)}@example.com")
        sign_ups.append(SignUp(before, response.status_code, time.monotonic() - started, subscribers(site.nl)))
        time.sleep(0.05)
    output, errors = process.communicate()
    assert process.returncode == 0, errors
    assert output == "imported 100,000; already there 0; refused 0\n"
    assert errors == ""

    during = [s for s in sign_ups if 0 < s.before and s.after < BIG]
    assert len(during) >= 3, sign_ups  # the import was still running before and after each of these
    assert [s.status for s in sign_ups] == [200] * len(sign_ups)
    assert max(s.seconds for s in during) < 2.0, sorted(s.seconds for s in during)[-5:]
    assert site.record_signups() == len(sign_ups)
    assert subscribers(site.nl) == BIG + len(sign_ups)


def test_the_summary_counts_rows_imported_already_there_and_refused(nl, run, tmp_path: Path) -> None:
    """Counts in one line; --verbose adds a line for each row not imported. Nobody already on the list is
    changed, duplicates within the file count once (also across the thousand-row chunks)."""
    earlier = tmp_path / "earlier.csv"
    earlier.write_text("email,status\ngone@example.com,unsubscribed\nada@example.com,confirmed\n", encoding="utf-8")
    assert run("subscribers", "import", str(earlier)).output == "imported 2; already there 0; refused 0\n"

    rows = [f"reader{i:04d}@example.com,," for i in range(2500)]
    rows[9] = "GONE@example.com,confirmed,"  # line 11
    rows[99] = "reader0003@example.com,,"  # line 101, a duplicate in the same chunk
    rows[199] = "not-an-address,confirmed,"  # line 201
    rows[1199] = "ada@example.com,,"  # line 1201
    rows[1499] = "reader0004@example.com,,"  # line 1501, a duplicate in a later chunk
    rows[1999] = "ip@example.com,confirmed,=HYPERLINK()"  # line 2001
    rows[2299] = "status@example.com,pending,"  # line 2301
    readers = tmp_path / "readers.csv"
    readers.write_text("email,status,subscribed_ip\n" + "\n".join(rows) + "\n", encoding="utf-8")

    result = run("subscribers", "import", "--verbose", str(readers))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "imported 2,493; already there 4; refused 3",
        "  line 11: GONE@example.com is already a subscriber",
        "  line 101: reader0003@example.com is already a subscriber",
        "  line 201: 'not-an-address': An email address must have an @-sign.",
        "  line 1201: ada@example.com is already a subscriber",
        "  line 1501: reader0004@example.com is already a subscriber",
        "  line 2001: 'ip@example.com': subscribed_ip '=HYPERLINK()' is not an IP address",
        "  line 2301: 'status@example.com': status 'pending' is not one of unconfirmed, confirmed, unsubscribed, "
        "bounced",
    ]
    assert status_of(nl, "gone@example.com") is Status.UNSUBSCRIBED
    assert subscribers(nl) == 2 + 2493

    again = run("subscribers", "import", str(readers))
    assert again.output == "imported 0; already there 2,497; refused 3 (run with --verbose to list them)\n"
    assert subscribers(nl) == 2 + 2493


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_import_keeps_its_chunks_and_a_rerun_finishes_it(
    nl, run, newsletter: Start, tmp_path: Path, stop: signal.Signals
) -> None:
    readers = readers_file(tmp_path / "readers.csv", 50_000)
    process = newsletter("subscribers", "import", str(readers))
    wait_for(lambda: subscribers(nl) >= 1000, timeout=60)
    process.send_signal(stop)
    output, errors = process.communicate(timeout=60)
    assert process.returncode == 128 + stop, errors
    assert "Traceback" not in errors
    [line] = output.splitlines()
    imported = int(line.removeprefix("imported ").split(";")[0].replace(",", ""))
    assert line == (
        f"imported {imported:,}; already there 0; refused 0; "
        "interrupted: the rows imported so far are kept, run the same import again to finish"
    )
    assert 1000 <= imported == subscribers(nl) < 50_000

    rerun = run("subscribers", "import", str(readers))
    assert rerun.exit_code == 0
    assert rerun.output == (
        f"imported {50_000 - imported:,}; already there {imported:,}; refused 0 (run with --verbose to list them)\n"
    )
    assert subscribers(nl) == 50_000


def read_terminal(terminal: int) -> str:
    """All that was written to the pseudo-terminal TERMINAL until the last process holding its other end closed it."""
    seen = b""
    while True:
        try:
            data = os.read(terminal, 65536)
        except OSError:  # EIO: nobody holds the other end any more
            break
        if not data:
            break
        seen += data
    return seen.decode()


def test_a_terminal_shows_a_progress_bar(nl, newsletter: Start, tmp_path: Path) -> None:
    readers = readers_file(tmp_path / "readers.csv", 5000)
    terminal, its_end = pty.openpty()
    process = newsletter("subscribers", "import", str(readers), stderr=its_end)
    os.close(its_end)
    shown = read_terminal(terminal)
    os.close(terminal)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    assert "readers.csv  [" in shown and "2000/5000" in shown and "5000/5000" in shown, shown
    assert output == "imported 5,000; already there 0; refused 0\n"


def test_without_a_terminal_there_is_no_bar(nl, newsletter: Start, tmp_path: Path) -> None:
    readers = readers_file(tmp_path / "readers.csv", 5000)
    process = newsletter("subscribers", "import", str(readers))
    output, errors = process.communicate(timeout=60)
    assert process.returncode == 0
    assert (output, errors) == ("imported 5,000; already there 0; refused 0\n", "")
