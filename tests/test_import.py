"""`newsletter subscribers import` of a large file: committed in chunks while the sign-up form keeps
answering, a summary line with counts, progress on a terminal, and an interrupted import finished by a rerun;
the exports of other services (tests/imports/) recognised by their columns, with their consent record, who
left kept away from every mailing, no email sent, and a second run that changes nothing."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from newsletter import manage
from newsletter.models import OutboxMessage, Status, Subscriber

from .conftest import SMTPSink, publish, wait_for
from .test_cli import failure
from .test_cli import newsletter as newsletter_command
from .test_consent import bounced
from .test_owner_output import leave

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
    whole import (SQLite has one writer at a time): each is answered within a second."""
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
    assert max(s.seconds for s in during) < 1.0, sorted(s.seconds for s in during)[-5:]
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


# ---- the exports of other services ---------------------------------------------------------------

IMPORTS = Path(__file__).parent / "imports"
MAILCHIMP_AGENT = "newsletter command line: import from Mailchimp"


def sample(name: str) -> str:
    return str(IMPORTS / name)


def imported(run, name: str, *options: str) -> list[str]:
    """What `newsletter subscribers import` prints for the sample file NAME; it succeeds."""
    result = run("subscribers", "import", *options, sample(name))
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def reader(nl, address: str) -> Subscriber | None:
    with nl.sessions() as session:
        return session.scalar(select(Subscriber).where(Subscriber.email_key == address))


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def nothing_mailed(nl, smtp: SMTPSink) -> bool:
    with nl.sessions() as session:
        queued = session.scalar(select(func.count()).select_from(OutboxMessage))
    return smtp.messages == [] and queued == 0


def mailed_by_the_next_send(run, smtp: SMTPSink, feed: Path) -> list[str]:
    """The readers a new post goes to."""
    publish(feed, "Boats back in the harbour", "boats-back")
    smtp.clear()
    result = run("send")
    assert result.exit_code == 0, result.output
    return sorted(r for m in smtp.messages for r in m.recipients)


def test_a_mailchimp_audience_export_keeps_its_consent_record_and_who_left_is_never_mailed(
    nl, run, smtp: SMTPSink, feed: Path
) -> None:
    """Mailchimp's export is a zip of three files; each is recognised, with its consent times and addresses.
    Unsubscribed contacts come in unsubscribed, cleaned ones (hard bounces) bounced: kept so that the address
    is never mailed nor added again, and never sent a post."""
    run("posts", "fetch")
    assert imported(run, "mailchimp_subscribed.csv") == [
        "recognised a Mailchimp audience export",
        "imported 5; already there 0; refused 0",
    ]
    assert imported(run, "mailchimp_unsubscribed.csv") == [
        "recognised a Mailchimp audience export (unsubscribed contacts: imported as unsubscribed, never mailed)",
        "imported 2; already there 0; refused 0",
    ]
    assert imported(run, "mailchimp_cleaned.csv") == [
        "recognised a Mailchimp audience export (cleaned contacts, whose address bounced: imported as bounced, "
        "never mailed)",
        "imported 1; already there 0; refused 0",
    ]
    assert nothing_mailed(nl, smtp)

    ada = reader(nl, "ada@example.com")
    assert ada is not None and ada.status is Status.CONFIRMED
    assert (ada.subscribed_at, ada.subscribed_ip) == (at("2024-03-05 14:01:40"), "198.51.100.23")
    assert (ada.confirmed_at, ada.confirmed_ip) == (at("2024-03-05 14:02:11"), "198.51.100.23")
    assert ada.subscribed_user_agent == ada.confirmed_user_agent == MAILCHIMP_AGENT
    ken = reader(nl, "ken@example.com")
    assert ken is not None and (ken.subscribed_ip, ken.confirmed_ip) == ("2001:db8::7", "2001:db8::7")
    grace = reader(nl, "grace@example.com")  # added by hand in Mailchimp: no opt-in time
    assert grace is not None and grace.subscribed_at == grace.confirmed_at == at("2023-11-20 08:15:02")
    assert grace.subscribed_ip is None and grace.confirmed_ip is None

    left = reader(nl, "left@example.com")
    assert left is not None and left.status is Status.UNSUBSCRIBED
    assert (left.subscribed_at, left.confirmed_at) == (at("2022-04-10 12:00:05"), at("2022-04-10 12:03:44"))
    assert (left.unsubscribed_at, left.unsubscribed_user_agent) == (at("2024-02-01 07:12:55"), MAILCHIMP_AGENT)
    dead = reader(nl, "dead@example.com")
    assert dead is not None and dead.status is Status.BOUNCED and dead.confirmed_ip == "203.0.113.50"

    assert mailed_by_the_next_send(run, smtp, feed) == [
        "ada@example.com",
        "grace@example.com",
        "ken@example.com",
        "linus@example.org",
        "margaret@example.org",
    ]


def test_feedburner_rows_pending_verification_are_skipped_and_nobody_is_mailed(nl, run, smtp: SMTPSink) -> None:
    """FeedBurner's Active readers confirmed; those Pending Verification never did, and confirming them would
    take an email from us they never asked for: they are not imported, and the summary says so."""
    recognised = (
        "recognised a FeedBurner subscriber export (Pending Verification rows are skipped: they never confirmed, "
        "and an import sends no email)"
    )
    assert imported(run, "feedburner.csv", "--verbose") == [
        recognised,
        "imported 3; already there 0; refused 0; skipped 1 never confirmed",
        "  line 5: 'waiting@example.org': Pending Verification at FeedBurner, never confirmed: not imported",
    ]
    assert imported(run, "feedburner_bom.csv") == [  # saved by Excel as "CSV UTF-8": a BOM and CRLF
        recognised,
        "imported 1; already there 0; refused 0; skipped 1 never confirmed (run with --verbose to list them)",
    ]
    for address, day in [
        ("one@example.org", "2012-06-18"),
        ("three@example.com", "2019-02-14"),
        ("bom@example.org", "2018-04-01"),
    ]:
        found = reader(nl, address)
        assert found is not None and (found.status, found.subscribed_at) == (Status.CONFIRMED, at(day))
        assert found.confirmed_user_agent == "newsletter command line: import from FeedBurner"
    assert reader(nl, "waiting@example.org") is None and reader(nl, "never@example.org") is None
    assert nothing_mailed(nl, smtp)


def test_a_substack_export_separated_by_commas_or_tabs(nl, run, smtp: SMTPSink) -> None:
    """A paid subscription is no matter to the list; a reader who turned emails off is imported unsubscribed."""
    assert imported(run, "substack.csv") == [
        "recognised a Substack subscriber export (readers with email_disabled: imported as unsubscribed, never mailed)",
        "imported 3; already there 0; refused 0",
    ]
    assert imported(run, "substack_tabs.tsv") == [
        "recognised a Substack subscriber export, separated by tabs (readers with email_disabled: imported as "
        "unsubscribed, never mailed)",
        "imported 2; already there 0; refused 0",
    ]
    statuses = {a: reader(nl, a).status for a in ["reader@example.com", "patron@example.com", "quiet@example.org"]}
    assert statuses == {
        "reader@example.com": Status.CONFIRMED,
        "patron@example.com": Status.CONFIRMED,
        "quiet@example.org": Status.UNSUBSCRIBED,
    }
    assert reader(nl, "reader@example.com").subscribed_at == at("2023-01-04 18:22:10")
    assert reader(nl, "muted@example.com").status is Status.UNSUBSCRIBED
    assert reader(nl, "tabbed@example.com").subscribed_at == at("2024-02-10 11:11:11")
    assert nothing_mailed(nl, smtp)


def test_wordpress_and_a_spreadsheet_saved_with_semicolons(nl, run, smtp: SMTPSink, tmp_path: Path) -> None:
    assert imported(run, "jetpack.csv") == [
        "recognised a WordPress.com/Jetpack subscriber export",
        "imported 2; already there 0; refused 0",
    ]
    blog = reader(nl, "blogreader@example.com")
    assert blog is not None and (blog.status, blog.subscribed_at) == (Status.CONFIRMED, at("2021-03-14 09:12:45"))

    assert imported(run, "mailchimp_semicolons.csv") == [
        "recognised a Mailchimp audience export, separated by semicolons",
        "imported 2; already there 0; refused 0",
    ]
    anna = reader(nl, "anna@example.de")
    assert anna is not None and (anna.confirmed_at, anna.confirmed_ip) == (at("2024-05-02 07:46:12"), "198.51.100.61")

    ours = tmp_path / "ours.csv"  # this newsletter's own columns, as a European spreadsheet saves them
    ours.write_text("\ufeffemail;status;subscribed_at\nsemi@example.com;unsubscribed;2024-01-31T12:00:00+00:00\n")
    result = run("subscribers", "import", str(ours))
    assert result.output.splitlines() == [
        "recognised a list with an email column, separated by semicolons",
        "imported 1; already there 0; refused 0",
    ]
    assert reader(nl, "semi@example.com").status is Status.UNSUBSCRIBED
    assert nothing_mailed(nl, smtp)


def test_an_import_never_overrides_a_readers_choice(nl, run, smtp: SMTPSink, feed: Path) -> None:
    """Who unsubscribed, bounced or was erased here stays so, whatever the other service's file says."""
    bounced(run, smtp, feed, "ken@example.com")
    for address in ("grace@example.com", "linus@example.org"):
        run("subscribers", "add", address, "--confirmed")
    leave(nl, "grace@example.com")
    with nl.sessions.begin() as session:
        manage.erase(session, nl, session.scalars(select(Subscriber).filter_by(email_key="linus@example.org")).one())
    before = {a: reader(nl, a) for a in ("grace@example.com", "ken@example.com")}

    assert imported(run, "mailchimp_subscribed.csv", "--verbose") == [
        "recognised a Mailchimp audience export",
        "imported 2; already there 2; refused 1",
        "  line 3: grace@example.com is already a subscriber",
        "  line 4: ken@example.com is already a subscriber",
        "  line 5: linus@example.org was erased at the reader's request",
    ]
    for address, was in before.items():
        now = reader(nl, address)
        assert now is not None and was is not None
        assert (now.status, now.confirmed_at, now.unsubscribed_at) == (
            was.status,
            was.confirmed_at,
            was.unsubscribed_at,
        )
    assert reader(nl, "grace@example.com").status is Status.UNSUBSCRIBED
    assert reader(nl, "ken@example.com").status is Status.BOUNCED
    assert reader(nl, "linus@example.org") is None
    assert mailed_by_the_next_send(run, smtp, feed) == ["ada@example.com", "margaret@example.org"]


def test_a_second_run_changes_nothing_and_says_so(nl, run, smtp: SMTPSink) -> None:
    samples = sorted(path.name for path in IMPORTS.iterdir() if path.name != "unknown.csv")
    for name in samples:
        imported(run, name)
    exported = run("subscribers", "export").output

    again = {name: imported(run, name)[-1] for name in samples}
    assert again["mailchimp_subscribed.csv"] == (
        "imported 0; already there 5; refused 0; nothing to import: every address is already on the list"
    )
    assert again["feedburner.csv"] == (
        "imported 0; already there 3; refused 0; skipped 1 never confirmed; "
        "nothing to import: every other address is already on the list"
    )
    assert all("nothing to import" in line for line in again.values()), again
    assert run("subscribers", "export").output == exported
    assert nothing_mailed(nl, smtp)


def test_a_dry_run_counts_what_it_would_import_and_writes_nothing(nl, run, tmp_path: Path) -> None:
    assert imported(run, "mailchimp_subscribed.csv", "--dry-run") == [
        "recognised a Mailchimp audience export",
        "dry run: would import 5; already there 0; refused 0; nothing was written",
    ]
    assert subscribers(nl) == 0

    rows = [f"reader{i:04d}@example.com" for i in range(2500)]
    rows[1499] = "reader0004@example.com"  # the same address in a later chunk
    rows[1999] = "not-an-address"
    readers = tmp_path / "readers.csv"
    readers.write_text("email\n" + "\n".join(rows) + "\n", encoding="utf-8")
    dry = run("subscribers", "import", "--dry-run", str(readers))
    assert dry.output == (
        "dry run: would import 2,498; already there 1; refused 1 (run with --verbose to list them); "
        "nothing was written\n"
    )
    assert subscribers(nl) == 0
    real = run("subscribers", "import", str(readers))
    assert real.output == "imported 2,498; already there 1; refused 1 (run with --verbose to list them)\n"
    assert imported(run, "mailchimp_subscribed.csv")[-1] == "imported 5; already there 0; refused 0"
    assert imported(run, "mailchimp_subscribed.csv", "--dry-run")[-1] == (
        "dry run: would import 0; already there 5; refused 0; nothing to import: every address is already on the "
        "list; nothing was written"
    )
    assert subscribers(nl) == 2498 + 5


def test_a_file_of_unknown_layout_gets_one_line_with_the_columns_expected(nl, config_file: Path) -> None:
    line = failure(newsletter_command(config_file, "subscribers", "import", sample("unknown.csv")))
    assert line == (
        f"Error: {sample('unknown.csv')}: no column of email addresses; expected one called email (this "
        "newsletter's export, Substack, FeedBurner), Email Address (Mailchimp) or email_address "
        "(WordPress.com/Jetpack), and the first line names 'Name', 'Address', 'Joined'"
    )
    assert subscribers(nl) == 0


def test_the_readme_shows_what_an_import_of_mailchimp_files_prints(nl, run) -> None:
    """The README's example, replayed with the samples of Mailchimp's files (named as in Mailchimp's zip)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("It also reads the exports of other services") :]
    block = section[section.index("```\n") + 4 : section.index("\n```", section.index("```\n") + 4)]
    commands = [chunk.split("\n") for chunk in block.split("$ ")[1:]]
    assert len(commands) == 3
    for command, *shown in commands:
        export = command.split()[-1]
        assert command == f"newsletter subscribers import {export}"
        assert imported(run, "mailchimp_" + export.split("_")[0] + ".csv") == [line for line in shown if line]
