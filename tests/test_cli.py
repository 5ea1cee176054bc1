"""The `newsletter` command as a site owner uses it: help, subscribers, posts, sending, feeds."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

import click
import pytest
from aiosmtpd.controller import Controller
from click.testing import CliRunner, Result
from sqlalchemy import func, select, update

from newsletter.cli import cli
from newsletter.models import Delivery, OutboxMessage, Subscriber

from .conftest import FEEDS, SMTPSink, publish

ROOT = Path(__file__).parents[1]
Run = Callable[..., Result]


def newsletter(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed `newsletter` command in its own process, with no NEWSLETTER_* settings from this shell."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    return subprocess.run(
        ["newsletter", "--config", str(config), *args], capture_output=True, text=True, env=environ, timeout=60
    )


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def failure(result: subprocess.CompletedProcess[str]) -> str:
    """The one line on stderr of a command that failed."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    return one_line(result.stderr)


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def listed(run: Run, *options: str) -> list[str]:
    *rows, total = ok(run("subscribers", "list", *options)).splitlines()
    assert total.endswith(("subscriber", "subscribers")) and int(total.split()[0]) == len(rows)
    return [line.split()[0] for line in rows]


def count(nl, model: type, **where: object) -> int:
    query = select(func.count()).select_from(model).filter_by(**where)
    with nl.sessions() as session:
        return session.scalar(query) or 0


def post_states(run: Run) -> dict[str, str]:
    """Title -> new / sending / announced, from `posts list`."""
    states = {}
    for line in ok(run("posts", "list")).splitlines():
        _, _, state, rest = line.split(None, 3)
        states[rest.rsplit("  <", 1)[0]] = state
    return states


def set_site_key(config: Path, key: str, value: str) -> None:
    config.write_text(config.read_text().replace("[site]\n", f'[site]\n{key} = "{value}"\n', 1))


# ---- help -----------------------------------------------------------------------------------------


def command_paths(group: click.Group = cli, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from command_paths(command, (*prefix, name))
        else:
            yield (*prefix, name)


@pytest.mark.parametrize("path", [pytest.param(path, id=" ".join(path) or "newsletter") for path in command_paths()])
def test_help_shows_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="newsletter")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: {' '.join(('newsletter', *path))} ")
    assert "Example" in result.output


# ---- subscribers ----------------------------------------------------------------------------------


def test_add_normalises_the_address_and_keeps_one_row(nl, run: Run) -> None:
    assert ok(run("subscribers", "add", "Reader@Example.COM")).strip() == (
        "added Reader@example.com (unconfirmed): no email was sent; run with --invite to send a confirmation email"
    )
    assert "already there" in ok(run("subscribers", "add", "reader@EXAMPLE.com"))
    assert listed(run) == ["Reader@example.com"]
    assert listed(run, "--status", "confirmed") == []

    assert "(confirmed)" in ok(run("subscribers", "add", " reader@example.com ", "--confirmed"))
    assert listed(run, "--status", "confirmed") == ["Reader@example.com"]
    assert count(nl, Subscriber) == 1


def test_list_filters_by_status(nl, run: Run) -> None:
    run("subscribers", "add", "one@example.com", "--confirmed")
    run("subscribers", "add", "two@example.com")
    run("subscribers", "add", "three@example.com", "--confirmed")
    assert listed(run) == ["one@example.com", "two@example.com", "three@example.com"]
    assert listed(run, "--status", "confirmed") == ["one@example.com", "three@example.com"]
    assert listed(run, "--status", "unconfirmed") == ["two@example.com"]
    assert listed(run, "--status", "unsubscribed") == []


def test_adding_something_that_is_not_an_address_fails(nl, config_file: Path) -> None:
    line = failure(newsletter(config_file, "subscribers", "add", "not-an-address"))
    assert "'not-an-address'" in line and "@" in line
    assert newsletter(config_file, "subscribers", "list").stdout == "0 subscribers\n"


def test_remove_deletes_the_subscriber_their_deliveries_and_queued_mail(site, smtp, run: Run) -> None:
    for address in ("leaving@example.com", "staying@example.com"):
        site.subscribe(address)
        site.record_signups()  # each has a confirmation email waiting in the outbox
        run("subscribers", "add", address, "--confirmed")
    run("posts", "add", "--title", "Harbour works begin", "--url", "https://harbour-notes.example/works/")
    smtp.clear()
    assert "2 sent" in ok(run("send", "--no-fetch"))
    with site.nl.sessions() as session:
        leaving = session.scalar(select(Subscriber.id).where(Subscriber.email_key == "leaving@example.com"))
    assert count(site.nl, Delivery, subscriber_id=leaving) == 1
    assert count(site.nl, OutboxMessage, subscriber_id=leaving) == 1

    assert (
        ok(run("subscribers", "remove", "LEAVING@example.com")).strip() == "removed leaving@example.com and their data"
    )
    assert listed(run) == ["staying@example.com"]
    assert count(site.nl, Subscriber, id=leaving) == 0
    assert count(site.nl, Delivery, subscriber_id=leaving) == 0
    assert count(site.nl, OutboxMessage, subscriber_id=leaving) == 0
    assert count(site.nl, Delivery) == count(site.nl, OutboxMessage) == 1

    smtp.clear()
    assert "outbox: 1 sent" in ok(run("worker", "--once"))
    assert [m.recipients for m in smtp.messages] == [["staying@example.com"]]


def test_stats_counts_queued_mail_by_kind(site, smtp, run: Run) -> None:
    site.subscribe("new@example.com")
    site.subscribe("other@example.com")
    site.record_signups()
    assert "outbox: 2 queued (2 confirmation), 0 held" in ok(run("stats"))
    site.deliver_outbox()
    site.press(next(link for link in smtp.messages[0].links() if "/confirm/" in link))
    assert "outbox: 1 queued (1 welcome), 0 held" in ok(run("stats"))


def test_removing_an_unknown_address_fails(nl, config_file: Path) -> None:
    assert "nobody@example.com" in failure(newsletter(config_file, "subscribers", "remove", "nobody@example.com"))
    assert "'not-an-address'" in failure(newsletter(config_file, "subscribers", "remove", "not-an-address"))


def test_import_reports_what_it_imported_and_why_it_skipped_rows(nl, run: Run, tmp_path: Path) -> None:
    readers = tmp_path / "readers.csv"
    readers.write_text(
        "email,status\n"
        "Ada@Example.com,confirmed\n"
        "grace@example.com,\n"
        "not-an-address,confirmed\n"
        "ada@example.com,confirmed\n"
        "linus@example.com,pending\n"
        "ken@example.com,unconfirmed\n",
        encoding="utf-8",
    )
    lines = ok(run("subscribers", "import", "--verbose", str(readers))).splitlines()
    assert lines[0] == "imported 3; already there 1; refused 2"
    reasons = [line.strip() for line in lines[1:]]
    assert len(reasons) == 3
    assert reasons[0].startswith("line 4: 'not-an-address'") and "@" in reasons[0]
    assert reasons[1].startswith("line 5:") and "ada@example.com is already a subscriber" in reasons[1]
    assert reasons[2].startswith("line 6:") and "'pending'" in reasons[2] and "confirmed" in reasons[2]
    assert listed(run, "--status", "confirmed") == ["Ada@example.com", "grace@example.com"]
    assert listed(run, "--status", "unconfirmed") == ["ken@example.com"]


def test_import_needs_an_email_column(nl, config_file: Path, tmp_path: Path) -> None:
    readers = tmp_path / "readers.csv"
    readers.write_text("address,status\nada@example.com,confirmed\n", encoding="utf-8")
    line = failure(newsletter(config_file, "subscribers", "import", str(readers)))
    assert "readers.csv" in line and "email" in line
    assert newsletter(config_file, "subscribers", "list").stdout == "0 subscribers\n"


def test_import_ignores_an_unnamed_extra_field(nl, config_file: Path, tmp_path: Path) -> None:
    readers = tmp_path / "readers.csv"
    readers.write_text(
        "email,status\nada@example.com,confirmed\ngrace@example.com,confirmed,VIP\nken@example.com,confirmed\n",
        encoding="utf-8",
    )
    result = newsletter(config_file, "subscribers", "import", str(readers))
    assert "Traceback" not in result.stderr
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported 3; already there 0; refused 0"
    assert newsletter(config_file, "subscribers", "list").stdout.split()[:-2:3] == [
        "ada@example.com",
        "grace@example.com",
        "ken@example.com",
    ]


def test_import_of_a_file_that_is_not_utf8_fails_with_one_line(nl, config_file: Path, tmp_path: Path) -> None:
    readers = tmp_path / "readers.csv"
    readers.write_bytes("email,name\nj@example.com,Jörg\n".encode("latin-1"))
    line = failure(newsletter(config_file, "subscribers", "import", str(readers)))
    assert "readers.csv" in line and "UTF-8" in line


EXPORT_COLUMNS = [
    "email",
    "status",
    "created_at",
    "subscribed_at",
    "subscribed_ip",
    "confirmed_at",
    "confirmed_ip",
    "unsubscribed_at",
    "unsubscribed_ip",
]


def exported(run: Run) -> list[dict[str, str]]:
    output = ok(run("subscribers", "export"))
    reader = csv.DictReader(io.StringIO(output))
    rows = list(reader)
    assert reader.fieldnames == EXPORT_COLUMNS
    return rows


def second_install(config_file: Path, tmp_path: Path) -> Run:
    """Another installation: the same settings with its own, freshly upgraded SQLite database."""
    other = tmp_path / "other.toml"
    other.write_text(
        "\n".join(
            f'url = "sqlite:///{tmp_path / "other.db"}"' if line.startswith("url =") else line
            for line in config_file.read_text().splitlines()
        )
    )
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        return runner.invoke(cli, ["--config", str(other), *args], catch_exceptions=False)

    assert "database upgraded" in ok(invoke("db", "upgrade"))
    return invoke


def test_export_prints_every_subscriber_with_consent(site, run: Run) -> None:
    site.subscribe("web@example.com")
    site.record_signups()
    run("subscribers", "add", "hand@example.com", "--confirmed")
    run("subscribers", "add", "pending@example.com")

    rows = exported(run)
    assert [(r["email"], r["status"]) for r in rows] == [
        ("web@example.com", "unconfirmed"),
        ("hand@example.com", "confirmed"),
        ("pending@example.com", "unconfirmed"),
    ]
    web, hand, pending = rows
    assert web["subscribed_ip"] == "127.0.0.1" and web["subscribed_at"].startswith(web["created_at"][:10])
    assert hand["confirmed_at"] and not hand["confirmed_ip"]
    assert not pending["confirmed_at"] and not pending["unsubscribed_at"]


def test_export_writes_no_formula_and_import_reads_it_back(nl, run: Run, tmp_path: Path) -> None:
    """Cells a spreadsheet would run (OWASP CSV injection) get a leading quote; import takes it off again."""
    addresses = ["=1+1@example.com", "-2+3@example.com", "+sum@example.com", "plain@example.com", "'-x@example.com"]
    for address in addresses:
        run("subscribers", "add", "--confirmed", "--", address)
    # No address or IP starts with @, a tab or a CR: such cells come only from editing the database by hand
    edited = {"at@example.com": "@SUM(1+1)", "tab@example.com": "\t=1+1", "cr@example.com": "\r=1+1"}
    for address, cell in edited.items():
        run("subscribers", "add", "--confirmed", address)
        with nl.sessions.begin() as session:
            session.execute(update(Subscriber).where(Subscriber.email == address).values(subscribed_ip=cell))
    exported = ok(run("subscribers", "export"))
    header, *rows = csv.reader(io.StringIO(exported))
    assert [row[0] for row in rows] == [
        "'=1+1@example.com",
        "'-2+3@example.com",
        "'+sum@example.com",
        addresses[3],
        "''-x@example.com",
        *edited,
    ]
    assert [row[header.index("subscribed_ip")] for row in rows[5:]] == ["'@SUM(1+1)", "'\t=1+1", "'\r=1+1"]
    assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for row in rows for cell in row)

    for address in [*addresses, *edited]:
        run("subscribers", "remove", "--", address)
    (tmp_path / "export.csv").write_text(exported, encoding="utf-8")
    lines = ok(run("subscribers", "import", "--verbose", str(tmp_path / "export.csv"))).splitlines()
    assert lines[0] == "imported 5; already there 0; refused 3"
    assert lines[1:] == [  # each cell read back as it was in the database, and refused: it is not an IP
        "  line 7: 'at@example.com': subscribed_ip '@SUM(1+1)' is not an IP address",
        "  line 8: 'tab@example.com': subscribed_ip '\\t=1+1' is not an IP address",
        "  line 9: 'cr@example.com': subscribed_ip '\\r=1+1' is not an IP address",
    ]
    assert listed(run) == addresses


def test_import_refuses_an_ip_column_that_is_not_an_ip(nl, run: Run, tmp_path: Path) -> None:
    (tmp_path / "readers.csv").write_text(
        'email,subscribed_ip\nok@example.com,2001:db8::1\nbad@example.com,"=HYPERLINK(""https://x.example"")"\n'
    )
    lines = ok(run("subscribers", "import", "--verbose", str(tmp_path / "readers.csv"))).splitlines()
    assert lines[0] == "imported 1; already there 0; refused 1"
    assert (
        "  line 3: 'bad@example.com': subscribed_ip '=HYPERLINK(\"https://x.example\")' is not an IP address" in lines
    )
    assert listed(run) == ["ok@example.com"]


def test_export_round_trips_into_a_fresh_database(
    site,
    smtp,
    run: Run,
    config_file: Path,
    tmp_path: Path,
) -> None:
    site.subscribe("web@example.com")  # consent given on the page: time and address recorded
    run("subscribers", "add", "web@example.com", "--confirmed")
    run("subscribers", "add", "Ada@Example.com", "--confirmed")
    run("subscribers", "add", "ken@example.com")
    run("subscribers", "add", "left@example.com", "--confirmed")
    run("posts", "add", "--title", "Ice on the quay", "--url", "https://harbour-notes.example/ice/")
    run("send", "--no-fetch")
    [note] = smtp.to("left@example.com")
    assert site.post(note.message["List-Unsubscribe"].strip("<>"), data={"List-Unsubscribe": "One-Click"}).ok
    before = exported(run)
    assert [(r["email"], r["status"]) for r in before] == [
        ("web@example.com", "confirmed"),
        ("Ada@example.com", "confirmed"),
        ("ken@example.com", "unconfirmed"),
        ("left@example.com", "unsubscribed"),
    ]
    dump = tmp_path / "subscribers.csv"
    dump.write_text(ok(run("subscribers", "export")), encoding="utf-8")

    other = second_install(config_file, tmp_path)
    assert ok(other("subscribers", "import", str(dump))).strip() == "imported 4; already there 0; refused 0"
    assert exported(other) == before  # addresses, statuses and the consent record, column for column
    assert listed(other, "--status", "confirmed") == ["web@example.com", "Ada@example.com"]


# ---- posts and sending ----------------------------------------------------------------------------


def test_added_post_is_announced_once_to_confirmed_subscribers(nl, smtp, run: Run) -> None:
    run("subscribers", "add", "ada@example.com", "--confirmed")
    run("subscribers", "add", "pending@example.com")
    added = ok(
        run(
            "posts",
            "add",
            "--title",
            "Ice on the quay",
            "--url",
            "https://harbour-notes.example/ice/",
            "--summary",
            "The harbour froze overnight.\n\nBoats stayed in.",
        )
    )
    assert added.strip().endswith(": Ice on the quay")
    assert post_states(run) == {"Ice on the quay": "new"}

    assert ok(run("send", "--no-fetch")).strip() == "1 post(s): 1 sent, 0 failed, 0 skipped, 0 left for the next run"
    [note] = smtp.messages
    assert note.recipients == ["ada@example.com"] and note.message["Subject"] == "Ice on the quay"
    assert "The harbour froze overnight." in note.text and "<p>Boats stayed in.</p>" in note.html
    assert post_states(run) == {"Ice on the quay": "announced"}

    assert "0 sent" in ok(run("send", "--no-fetch"))
    assert len(smtp.messages) == 1


def test_post_link_must_be_http(nl, config_file: Path) -> None:
    line = failure(newsletter(config_file, "posts", "add", "--title", "Hi", "--url", "javascript:alert(1)"))
    assert "--url" in line and "http" in line
    assert newsletter(config_file, "posts", "list").stdout == ""


def test_dry_run_shows_what_would_be_sent_and_sends_nothing(nl, smtp, run: Run) -> None:
    run("subscribers", "add", "ada@example.com", "--confirmed")
    run("posts", "add", "--title", "Ice on the quay", "--url", "https://harbour-notes.example/ice/")

    output = ok(run("send", "--dry-run"))
    assert "would announce: Ice on the quay" in output
    assert "first fetch of the feed: its 3 entries would be marked as already announced" in output
    assert output.splitlines()[-1] == "dry run: 1 post(s) to 1 confirmed subscriber(s); nothing sent"
    assert smtp.messages == []
    assert post_states(run) == {"Ice on the quay": "new"}  # the feed's posts were not recorded either
    assert count(nl, Delivery) == 0

    assert "1 sent" in ok(run("send", "--no-fetch"))
    assert smtp.subjects("ada@example.com") == ["Ice on the quay"]


def test_send_to_one_address_sends_a_copy_and_records_nothing(nl, smtp, run: Run) -> None:
    run("subscribers", "add", "ada@example.com", "--confirmed")
    run("posts", "add", "--title", "Older post", "--url", "https://harbour-notes.example/older/")
    run("posts", "add", "--title", "Ice on the quay", "--url", "https://harbour-notes.example/ice/")

    assert (
        ok(run("send", "--to", "Me@Example.com")).strip()
        == 'sent a copy of "Ice on the quay" to Me@example.com (nothing recorded)'
    )
    [copy] = smtp.messages
    assert copy.recipients == ["Me@example.com"] and copy.message["Subject"] == "Ice on the quay"
    assert "https://harbour-notes.example/ice/" in copy.text
    assert post_states(run) == {"Older post": "new", "Ice on the quay": "new"}
    assert count(nl, Delivery) == 0

    smtp.clear()
    assert "2 sent" in ok(run("send", "--no-fetch"))
    assert sorted(smtp.subjects("ada@example.com")) == ["Ice on the quay", "Older post"]
    assert smtp.to("me@example.com") == []


def test_dry_run_with_to_sends_nothing(nl, smtp, run: Run) -> None:
    run("posts", "add", "--title", "Ice on the quay", "--url", "https://harbour-notes.example/ice/")
    result = run("send", "--dry-run", "--to", "me@example.com")
    assert result.exit_code == 0 and "nothing sent" in result.output
    assert smtp.messages == []


def test_every_send_ends_with_a_summary(nl, smtp, run: Run) -> None:
    assert ok(run("send", "--no-fetch")).strip() == "0 post(s): 0 sent, 0 failed, 0 skipped, 0 left for the next run"
    assert "nothing sent" in ok(run("send", "--no-fetch", "--dry-run")).splitlines()[-1]
    assert ok(run("send")).splitlines()[-1].startswith("0 post(s): 0 sent")  # first fetch: nothing to announce


def test_send_while_the_smtp_server_is_down_then_up(nl, run: Run, config_file: Path, smtp_port: int) -> None:
    for address in ("a@example.com", "b@example.com", "c@example.com"):
        run("subscribers", "add", address, "--confirmed")
    run("posts", "add", "--title", "Ice on the quay", "--url", "https://harbour-notes.example/ice/")

    down = newsletter(config_file, "send", "--no-fetch")  # nothing listens on the configured port
    assert down.returncode == 1
    line = one_line(down.stdout + down.stderr)
    assert "0 sent" in line and f"127.0.0.1:{smtp_port}" in line and "Connection refused" in line
    assert post_states(run) == {"Ice on the quay": "sending"}

    sink = SMTPSink()
    controller = Controller(sink, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    try:
        up = newsletter(config_file, "send", "--no-fetch")
        assert up.returncode == 0, up.stderr
        assert one_line(up.stdout) == "1 post(s): 3 sent, 0 failed, 0 skipped, 0 left for the next run"
        again = newsletter(config_file, "send", "--no-fetch")
        assert "0 sent" in one_line(again.stdout)
    finally:
        controller.stop()
    assert sorted(r for m in sink.messages for r in m.recipients) == ["a@example.com", "b@example.com", "c@example.com"]
    assert post_states(run) == {"Ice on the quay": "announced"}


def test_summary_counts_what_is_left_when_the_smtp_server_is_down(nl, run: Run) -> None:
    for address in ("a@example.com", "b@example.com", "c@example.com"):
        run("subscribers", "add", address, "--confirmed")
    run("posts", "add", "--title", "Ice on the quay", "--url", "https://harbour-notes.example/ice/")
    result = run("send", "--no-fetch")
    assert result.exit_code == 1
    assert "3 left for the next run" in result.stdout


def test_own_text_template_replaces_only_the_text_part(
    nl,
    smtp,
    run: Run,
    config_file: Path,
    tmp_path: Path,
) -> None:
    templates = tmp_path / "my-templates"
    (templates / "email").mkdir(parents=True)
    (templates / "email" / "notification.txt").write_text(
        "Fresh from the harbour: {{ post.title }}\n{{ post.url }}\nLeave: {{ unsubscribe_url }}\n", encoding="utf-8"
    )
    set_site_key(config_file, "templates_dir", str(templates))
    run("subscribers", "add", "ada@example.com", "--confirmed")
    run("posts", "add", "--title", "Ice on the quay", "--url", "https://harbour-notes.example/ice/")

    ok(run("send", "--no-fetch"))
    [note] = smtp.messages
    text = note.text.replace("\r\n", "\n")
    assert text.startswith("Fresh from the harbour: Ice on the quay\nhttps://harbour-notes.example/ice/\n")
    assert "Leave: https://news.example.com/unsubscribe/" in text
    assert "New on Harbour Notes" not in text
    assert "New on Harbour Notes" in note.html and ">Read the post</a>" in note.html


def test_atom_feed_with_umlauts_and_a_relative_link(nl, smtp, run: Run, config_file: Path, feed: Path) -> None:
    config_file.write_text(config_file.read_text().replace(str(feed), str(FEEDS / "atom.xml")))
    run("subscribers", "add", "leser@example.com", "--confirmed")
    assert ok(run("posts", "fetch", "--announce-existing")).strip() == "2 new post(s)"

    assert "2 sent" in ok(run("send", "--no-fetch"))
    notes = {m.message["Subject"]: m for m in smtp.to("leser@example.com")}
    assert set(notes) == {"Schwalbenschwanz & Geduld: die Übung", "Die Hobelbank ist fertig"}
    note = notes["Schwalbenschwanz & Geduld: die Übung"]
    assert b"=?utf-8?" in note.raw.split(b"\r\n\r\n", 1)[0]  # the header itself stays ASCII
    assert "Zwölf Verbindungen" in note.text
    assert "https://werkstatt.example/2025/01/schwalbenschwanz/" in note.text
    assert 'href="https://werkstatt.example/2025/01/schwalbenschwanz/"' in note.html
    assert "Schwalbenschwanz &amp; Geduld: die Übung</a>" in note.html


@pytest.mark.parametrize("link", ["javascript:alert(1)", "data:text/html,<b>hi</b>", "file:///etc/passwd"])
def test_a_feed_entry_whose_link_is_not_http_is_skipped(
    nl, smtp, run: Run, feed: Path, link: str, caplog: pytest.LogCaptureFixture
) -> None:
    run("posts", "fetch")
    run("subscribers", "add", "ada@example.com", "--confirmed")
    publish(feed, "Fine post", "fine")
    text = feed.read_text(encoding="utf-8")
    item = f"<item><title>Bad link</title><link>{xml_escape(link)}</link><guid>bad-1</guid></item>\n\t<item>"
    feed.write_text(text.replace("<item>", item, 1), encoding="utf-8")

    assert "1 sent" in ok(run("send"))
    assert "Bad link" not in ok(run("posts", "list"))
    assert [m.message["Subject"] for m in smtp.messages] == ["Fine post"]
    assert "feed entry 'Bad link' skipped: its link '" + link.split(":")[0] in caplog.text
    assert "is not an http(s) URL" in caplog.text


def test_scripts_and_handlers_in_a_feed_never_reach_the_email(nl, smtp, run: Run, feed: Path) -> None:
    run("posts", "fetch")
    run("subscribers", "add", "ada@example.com", "--confirmed")
    publish(
        feed,
        "Tricky markup",
        "tricky",
        summary=(
            '<p onclick="steal()" style="position:fixed">Calm <a href="javascript:alert(2)">seas</a> today.</p>'
            "<script>alert(1)</script><style>body { display: none }</style>"
            '<p>More on <a href="https://harbour-notes.example/tides/">the tides</a>.</p>'
        ),
    )

    assert "1 sent" in ok(run("send"))
    [note] = smtp.messages
    for part in (note.text, note.html):
        for bad in (
            "<script",
            "alert(",
            "onclick",
            "steal()",
            "display: none",
            "javascript:",
            "position:fixed",
        ):
            assert bad not in part, (bad, part)
        assert "Calm" in part and "seas" in part and "the tides" in part
    head = note.html[: note.html.index("</head>")]
    assert "<style" not in note.text and note.html.count("<style") == head.count("<style")  # only the email's own
    assert note.html.index("<style") < note.html.index("</head>")
    assert '<a href="https://harbour-notes.example/tides/"' in note.html
    assert "the tides (https://harbour-notes.example/tides/)" in note.text


@pytest.mark.parametrize("where", ["missing file", "http 404"])
def test_feed_that_cannot_be_fetched_keeps_the_posts(
    site,
    run: Run,
    config_file: Path,
    feed: Path,
    where: str,
) -> None:
    assert ok(run("posts", "fetch")).startswith("3 new post(s)")
    before = ok(run("posts", "list"))
    gone = str(feed.with_name("moved.xml")) if where == "missing file" else f"{site.base}/feed/"
    config_file.write_text(config_file.read_text().replace(str(feed), gone))

    line = failure(newsletter(config_file, "posts", "fetch"))
    assert line.startswith(f"Error: cannot fetch the feed {gone}:")
    assert ("no such file" if where == "missing file" else "not found") in line.lower()
    assert ok(run("posts", "list")) == before
    assert newsletter(config_file, "send").returncode == 1


def test_db_upgrade_creates_the_folder_of_a_new_sqlite_database(config_file: Path, tmp_path: Path) -> None:
    database = tmp_path / "data" / "newsletter.db"
    config_file.write_text(
        "\n".join(
            f'url = "sqlite:///{database}"' if line.startswith("url =") else line
            for line in config_file.read_text().splitlines()
        )
    )
    result = newsletter(config_file, "db", "upgrade")
    assert result.returncode == 0, result.stderr
    assert database.is_file()


# ---- an installed copy ----------------------------------------------------------------------------


def test_pip_install_into_fresh_venv(smtp, smtp_port: int, tmp_path: Path) -> None:
    """A non-editable install finds its own templates and migrations, away from the source tree."""

    def leftovers() -> set[str]:
        return {p.name for p in ROOT.iterdir() if p.name in ("build", "dist") or p.name.endswith(".egg-info")}

    before = leftovers()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_") and k != "PYTHONPATH"}
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(ROOT)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr
    assert leftovers() == before

    home = tmp_path / "site"
    home.mkdir()
    config = home / "config.toml"
    config.write_text(f"""
[site]
name = "Harbour Notes"
base_url = "https://news.example.com"

[security]
secret_key = "installed-copy-secret-of-32-characters"

[database]
url = "sqlite:///{home / "newsletter.db"}"

[smtp]
host = "127.0.0.1"
port = {smtp_port}
security = "none"
from = "Harbour Notes <news@harbour-notes.example>"
""")

    def installed(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(venv / "bin" / "newsletter"), *args], capture_output=True, text=True, env=environ, cwd=home, timeout=60
        )
        assert result.returncode == 0, result.stderr
        return result

    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import newsletter; print(newsletter.__file__)"],
        capture_output=True,
        text=True,
        env=environ,
        cwd=home,
        check=True,
    ).stdout
    assert str(venv) in where and str(ROOT) not in where
    assert "Usage: newsletter" in installed("--help").stdout
    assert "database upgraded from (empty)" in installed("db", "upgrade").stdout
    installed("subscribers", "add", "x@example.com", "--confirmed")
    installed("posts", "add", "--title", "Installed and working", "--url", "https://harbour-notes.example/ok/")
    assert "1 sent" in installed("send", "--no-fetch").stdout
    [note] = smtp.to("x@example.com")
    assert note.message["Subject"] == "Installed and working"
    assert "Unsubscribe with one click" in note.text and "Read the post" in note.html


def test_the_example_configuration_comes_with_the_command_and_works_once_a_secret_is_set(tmp_path: Path) -> None:
    """What the error for a missing config.toml says to do works from an installed package, in an empty folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    missing = subprocess.run(["newsletter", "send"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "`newsletter config example > config.toml`" in missing.stderr
    example = subprocess.run(["newsletter", "config", "example"], cwd=tmp_path, capture_output=True, text=True)
    assert example.returncode == 0
    assert example.stdout == (Path(__file__).resolve().parent.parent / "config.example.toml").read_text()
    (tmp_path / "config.toml").write_text(example.stdout)
    env["NEWSLETTER_SECURITY__SECRET_KEY"] = "a-secret-of-forty-two-characters-or-so-000"
    upgraded = subprocess.run(["newsletter", "db", "upgrade"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert upgraded.returncode == 0, upgraded.stderr
    assert (tmp_path / "newsletter.db").is_file()
