"""Looking at a post before readers do (preview, a test copy of any post), holding fetched posts for approval,
skipping a post for good, and `posts list` / `send` output for scripts and logs."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import subprocess
import time
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select

from newsletter import dispatch
from newsletter.models import Delivery, DeliveryStatus, Status, Subscriber
from newsletter.runtime import Newsletter
from newsletter.subscriptions import set_frequency

from .conftest import SMTPSink, publish
from .test_cli import failure, newsletter
from .test_digests import digest_due_now


def require_approval(config: Path) -> None:
    config.write_text(config.read_text().replace("[site]\n", "[site]\nrequire_approval = true\n", 1))


def posts(config: Path) -> list[dict]:
    listed = newsletter(config, "posts", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def post_id(config: Path, title: str) -> int:
    return next(post["id"] for post in posts(config) if post["title"] == title)


def state_of(config: Path, title: str) -> str:
    return next(post["state"] for post in posts(config) if post["title"] == title)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def reader(config: Path, address: str) -> None:
    ok(newsletter(config, "subscribers", "add", address, "--confirmed"))


def parsed(raw: bytes) -> EmailMessage:
    return message_from_bytes(raw, policy=policy.default)  # type: ignore[return-value]


@pytest.fixture
def fresh_post(nl: Newsletter, config_file: Path, feed: Path) -> int:
    """A reader, the feed's existing entries (marked announced) and one new post, fetched: its id."""
    reader(config_file, "reader@example.com")
    ok(newsletter(config_file, "posts", "fetch"))
    publish(feed, "Ice on the quay", "ice", "<p>The first frost closed the quay.</p>")
    ok(newsletter(config_file, "posts", "fetch"))
    return post_id(config_file, "Ice on the quay")


# ---- preview and test copies ---------------------------------------------------------------------

OWN_LINKS = re.compile(r"https://news\.example\.com/(unsubscribe|manage)/[^\s\"<>]+")


def without_own_links(text: str) -> str:
    """TEXT with each reader's own links reduced to their kind: what differs from one reader to the next."""
    return OWN_LINKS.sub(r"\1", text)


def preview_bytes(config: Path, *args: str) -> bytes:
    shown = subprocess.run(
        ["newsletter", "--config", str(config), "posts", "preview", *args],
        capture_output=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")},
    )
    assert shown.returncode == 0, shown.stderr
    return shown.stdout


def test_preview_is_the_email_a_reader_gets(fresh_post: int, config_file: Path, smtp: SMTPSink, tmp_path: Path) -> None:
    preview = parsed(preview_bytes(config_file, str(fresh_post)))
    ok(newsletter(config_file, "send"))
    [sent] = smtp.to("reader@example.com")
    for header in ("Subject", "From", "List-Id", "List-Unsubscribe-Post", "Precedence", "Auto-Submitted"):
        assert preview[header] == sent.message[header], header
    assert preview["Subject"] == "Ice on the quay"
    assert preview["To"] == "reader@example.com"
    assert OWN_LINKS.fullmatch(preview["List-Unsubscribe"].strip("<>"))
    preview_text = preview.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    preview_html = preview.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert without_own_links(preview_text) == without_own_links(sent.text)
    assert without_own_links(preview_html) == without_own_links(sent.html)
    assert "The first frost closed the quay." in preview_text

    text = newsletter(config_file, "posts", "preview", str(fresh_post), "--text")
    assert ok(text) == preview_text.replace("\r\n", "\n")
    page = tmp_path / "ice.html"
    wrote = ok(newsletter(config_file, "posts", "preview", str(fresh_post), "--html", str(page)))
    assert wrote == f"wrote the HTML part of post {fresh_post} to {page}\n"
    assert without_own_links(page.read_text(encoding="utf-8")) == without_own_links(sent.html).replace("\r\n", "\n")


def test_the_preview_links_show_their_pages_and_change_nothing(
    fresh_post: int, config_file: Path, site, smtp: SMTPSink
) -> None:
    preview = parsed(preview_bytes(config_file, str(fresh_post)))
    unsubscribe = preview["List-Unsubscribe"].strip("<>")
    page = site.get(unsubscribe)
    assert page.status_code == 200 and "Unsubscribe from Harbour Notes?" in page.text
    assert site.press(unsubscribe).status_code == 200
    assert site.post(unsubscribe, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    preview_text = preview.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    [manage] = [link[0] for link in OWN_LINKS.finditer(preview_text) if link[1] == "manage"]
    assert site.get(manage).status_code == 400
    with site.nl.sessions() as session:
        assert session.scalars(select(Subscriber.status)).all() == [Status.CONFIRMED]
    ok(newsletter(config_file, "send"))
    assert smtp.subjects("reader@example.com") == ["Ice on the quay"]


def test_preview_of_a_post_that_does_not_exist(nl: Newsletter, config_file: Path) -> None:
    assert failure(newsletter(config_file, "posts", "preview", "42")) == (
        "Error: there is no post 42; `newsletter posts list` shows them"
    )


def test_a_test_copy_of_any_post(fresh_post: int, config_file: Path, smtp: SMTPSink, nl: Newsletter) -> None:
    oldest = min(post["id"] for post in posts(config_file))
    title = next(post["title"] for post in posts(config_file) if post["id"] == oldest)
    sent = ok(newsletter(config_file, "send", "--to", "owner@example.com", "--post", str(oldest)))
    assert sent == f'sent a copy of "{title}" to owner@example.com (nothing recorded)\n'
    assert smtp.subjects("owner@example.com") == [title]
    latest = ok(newsletter(config_file, "send", "--to", "owner@example.com"))
    assert latest == 'sent a copy of "Ice on the quay" to owner@example.com (nothing recorded)\n'
    assert failure(newsletter(config_file, "send", "--to", "owner@example.com", "--post", "42")) == (
        "Error: --post 42: there is no post 42; `newsletter posts list` shows them"
    )
    assert failure(newsletter(config_file, "send", "--post", str(oldest))) == (
        "Error: --post goes with --to ADDRESS (and not --digest): it sends a copy of that post to that address"
    )
    with nl.sessions() as session:
        assert session.scalars(select(Delivery)).all() == []
    assert smtp.to("reader@example.com") == []


# ---- approval ------------------------------------------------------------------------------------


def test_without_approval_a_fetched_post_goes_out(fresh_post: int, config_file: Path, smtp: SMTPSink) -> None:
    assert state_of(config_file, "Ice on the quay") == "new"
    ok(newsletter(config_file, "send"))
    assert smtp.subjects("reader@example.com") == ["Ice on the quay"]


def test_with_approval_fetched_posts_wait_for_it(nl: Newsletter, config_file: Path, feed: Path, smtp: SMTPSink) -> None:
    require_approval(config_file)
    reader(config_file, "reader@example.com")
    ok(newsletter(config_file, "posts", "fetch"))
    assert {post["state"] for post in posts(config_file)} == {"announced"}  # the first fetch: nothing waits
    publish(feed, "Ice on the quay", "ice")
    publish(feed, "Storm warning", "storm")
    ok(newsletter(config_file, "send"))
    ok(newsletter(config_file, "send"))
    assert smtp.messages == []
    assert state_of(config_file, "Ice on the quay") == state_of(config_file, "Storm warning") == "awaiting approval"
    listed = ok(newsletter(config_file, "posts", "list"))
    assert re.search(r"awaiting approval  Storm warning  <https://harbour-notes\.example/2025/04/storm/>", listed)
    assert "  announced          Welcome to Harbour Notes" in listed  # the column is as wide as its longest state

    ice = post_id(config_file, "Ice on the quay")
    assert ok(newsletter(config_file, "posts", "approve", str(ice))) == f"approved post {ice}: Ice on the quay\n"
    assert failure(newsletter(config_file, "posts", "approve", str(ice))) == (
        f"Error: post {ice} is new, not awaiting approval"
    )
    sent = ok(newsletter(config_file, "send"))
    assert sent == "1 post(s): 1 sent, 0 failed, 0 skipped, 0 left for the next run\n"
    assert smtp.subjects("reader@example.com") == ["Ice on the quay"]
    assert state_of(config_file, "Storm warning") == "awaiting approval"

    added = ok(
        newsletter(config_file, "posts", "add", "--title", "By hand", "--url", "https://harbour-notes.example/h/")
    )
    assert state_of(config_file, "By hand") == "new"  # the owner wrote it: no approval needed
    assert added.startswith("added post ")
    ok(newsletter(config_file, "send", "--no-fetch"))
    assert smtp.subjects("reader@example.com") == ["Ice on the quay", "By hand"]


# ---- skipping ------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra_config", [digest_due_now()])
@pytest.mark.parametrize("approval", [False, True], ids=["approval off", "approval on"])
def test_a_skipped_post_never_goes_out(
    nl: Newsletter, config_file: Path, feed: Path, smtp: SMTPSink, approval: bool
) -> None:
    if approval:
        require_approval(config_file)
    reader(config_file, "now@example.com")
    reader(config_file, "day@example.com")
    with nl.sessions.begin() as session:
        day = session.scalars(select(Subscriber).where(Subscriber.email_key == "day@example.com")).one()
        set_frequency(day, "daily")
    ok(newsletter(config_file, "posts", "fetch"))
    publish(feed, "Wrong draft", "wrong")
    publish(feed, "Right one", "right")
    ok(newsletter(config_file, "posts", "fetch"))
    if approval:
        ok(newsletter(config_file, "posts", "approve", str(post_id(config_file, "Right one"))))
    wrong = post_id(config_file, "Wrong draft")
    assert ok(newsletter(config_file, "posts", "skip", str(wrong))) == f"skipped post {wrong}: Wrong draft\n"
    assert state_of(config_file, "Wrong draft") == "skipped"
    assert failure(newsletter(config_file, "posts", "approve", str(wrong))) == (
        f"Error: post {wrong} is skipped, not awaiting approval"
    )
    for _ in range(3):
        ok(newsletter(config_file, "send"))
    assert smtp.subjects("now@example.com") == ["Right one"]
    [digest] = smtp.to("day@example.com")
    assert digest.message["Subject"] == "Daily digest from Harbour Notes: Right one"  # not "and 1 more"
    assert "Wrong draft" not in digest.text
    assert state_of(config_file, "Wrong draft") == "skipped"


@pytest.mark.parametrize("extra_config", [digest_due_now()])
def test_skipping_a_post_being_sent_stops_what_is_left(
    nl: Newsletter, config_file: Path, feed: Path, smtp: SMTPSink
) -> None:
    for address in ("now@example.com", "also@example.com", "day@example.com"):
        reader(config_file, address)
    with nl.sessions.begin() as session:
        day = session.scalars(select(Subscriber).where(Subscriber.email_key == "day@example.com")).one()
        set_frequency(day, "daily")
    ok(newsletter(config_file, "posts", "fetch"))
    publish(feed, "Half sent", "half")
    ok(newsletter(config_file, "posts", "fetch"))
    [queued] = dispatch.queue_posts(nl)  # a send that was stopped right after queueing the post
    assert state_of(config_file, "Half sent") == "sending"
    half = queued.id
    skipped = ok(newsletter(config_file, "posts", "skip", str(half)))
    assert skipped == f"skipped post {half}: Half sent; 3 reader(s) not reached yet will not get it\n"
    for _ in range(2):
        sent = ok(newsletter(config_file, "send"))
        assert sent == "0 post(s): 0 sent, 0 failed, 0 skipped, 0 left for the next run\n"
    assert smtp.messages == []
    with nl.sessions() as session:
        assert set(session.scalars(select(Delivery.status))) == {DeliveryStatus.SKIPPED}
    assert failure(newsletter(config_file, "posts", "skip", str(half))) == (
        f"Error: post {half} is skipped already; nothing to skip"
    )
    first = min(post["id"] for post in posts(config_file))
    assert failure(newsletter(config_file, "posts", "skip", str(first))) == (
        f"Error: post {first} is announced already; nothing to skip"
    )
    assert failure(newsletter(config_file, "posts", "skip", "42")) == (
        "Error: there is no post 42; `newsletter posts list` shows them"
    )


# ---- output for scripts and logs -----------------------------------------------------------------


def test_json_output_of_posts_list_and_send(fresh_post: int, config_file: Path, smtp: SMTPSink) -> None:
    listed = posts(config_file)
    assert [post["title"] for post in listed][0] == "Ice on the quay"
    assert listed[0] == {
        "id": fresh_post,
        "title": "Ice on the quay",
        "url": "https://harbour-notes.example/2025/04/ice/",
        "published_at": "2025-04-01T10:00:00+00:00",
        "state": "new",
        "categories": [],
    }
    assert {post["state"] for post in listed[1:]} == {"announced"}
    assert any(post["categories"] for post in listed[1:])
    sent = newsletter(config_file, "send", "--json")
    assert sent.returncode == 0, sent.stderr
    report = json.loads(sent.stdout)
    assert report == {
        "posts": 1,
        "digests": 0,
        "sent": 1,
        "failed": 0,
        "skipped": 0,
        "deferred": 0,
        "resent": 0,
        "quota_reached": False,
        "error": None,
        "failures": [],
        "interrupted": False,
    }
    assert failure(newsletter(config_file, "send", "--json", "--dry-run")) == (
        "Error: --json prints the summary of a send: it does not go with --to or --dry-run"
    )
    assert "1 post(s)" not in ok(newsletter(config_file, "posts", "list"))  # the human output is the default


class Slow(SMTPSink):
    """Takes half a second over every message, as a relay under load does."""

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(0.5)
        return await super().handle_DATA(server, session, envelope)


def test_without_a_terminal_send_logs_progress_every_ten_seconds(
    nl: Newsletter, config_file: Path, feed: Path, smtp_port: int, tmp_path: Path
) -> None:
    readers = tmp_path / "readers.csv"
    readers.write_text("email\n" + "".join(f"reader{i:02d}@example.com\n" for i in range(50)))
    ok(newsletter(config_file, "subscribers", "import", str(readers)))
    ok(newsletter(config_file, "posts", "fetch"))
    publish(feed, "Slow tide", "slow")
    sink = Slow()
    controller = Controller(sink, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    try:
        started = time.monotonic()
        sent = newsletter(config_file, "send")
        elapsed = time.monotonic() - started
    finally:
        controller.stop()
    assert sent.returncode == 0, sent.stderr
    assert elapsed > 10
    assert sent.stdout == "1 post(s): 50 sent, 0 failed, 0 skipped, 0 left for the next run\n"
    lines = sent.stderr.splitlines()
    assert 1 <= len(lines) <= elapsed // 10, sent.stderr
    for line in lines:
        assert re.fullmatch(r'sending "Slow tide": \d+/50 \(\d+%\), [\d,]+/s', line), line


def test_on_a_terminal_the_progress_bar_never_cuts_a_word(
    nl: Newsletter, config_file: Path, feed: Path, smtp: SMTPSink
) -> None:
    reader(config_file, "reader@example.com")
    ok(newsletter(config_file, "posts", "fetch"))
    publish(feed, "Harbour cranes return to the northern quay after repairs", "cranes")
    terminal, its_end = pty.openpty()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    process = subprocess.Popen(
        ["newsletter", "--config", str(config_file), "send"],
        stdout=subprocess.PIPE,
        stderr=its_end,
        text=True,
        env=environ,
    )
    os.close(its_end)
    shown = b""
    while True:
        try:
            data = os.read(terminal, 65536)
        except OSError:
            break
        if not data:
            break
        shown += data
    os.close(terminal)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    assert output == "1 post(s): 1 sent, 0 failed, 0 skipped, 0 left for the next run\n"
    text = shown.decode()
    assert "Harbour cranes return to the northern …  [" in text, text
    assert "northern qu" not in text
