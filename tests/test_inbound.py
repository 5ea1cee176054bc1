"""Mail that comes back, as a mail server hands it to `newsletter inbound`: bounces as Postfix and Exim write
them, a spam complaint (ARF), a mailto unsubscribe, a vacation reply and a forged token, each through stdin
(an MTA pipe) and through a Maildir, about emails a real send put on a real SMTP server."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from datetime import timedelta
from email.utils import formatdate
from pathlib import Path

import pytest
from sqlalchemy import select, update

from newsletter.models import Status, Subscriber

from .conftest import Caught, SMTPSink, publish

BOUNCES = "bounces@news.example.com"
VERP = re.compile(r"bounces\+([dgo][0-9]+-[a-z2-7]{16})@news\.example\.com")


@pytest.fixture
def extra_config() -> str:
    return f'\n[bounces]\naddress = "{BOUNCES}"\n'


def inbound(
    config_file: Path, raw: bytes, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """The message RAW piped into `newsletter inbound`, as Postfix's pipe or an alias runs it."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")} | (env or {})
    return subprocess.run(
        ["newsletter", "--config", str(config_file), "inbound", *args],
        input=raw,
        capture_output=True,
        env=environ,
        timeout=60,
    )


def handled(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    assert b"Traceback" not in result.stderr
    return result.stdout.decode().strip()


def through_maildir(config_file: Path, tmp_path: Path, raw: bytes) -> str:
    """RAW delivered into a Maildir, then `newsletter inbound --maildir`; the message ends in cur/."""
    box = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    (box / "new" / f"{len(list((box / 'cur').iterdir()))}.1733220000.mx").write_bytes(raw)
    output = handled(inbound(config_file, b"", "--maildir", str(box)))
    assert list((box / "new").iterdir()) == []
    return output


Deliver = Callable[[Path, Path, bytes], str]
PATHS = {
    "stdin": lambda config_file, tmp_path, raw: handled(inbound(config_file, raw)),
    "maildir": through_maildir,
}


@pytest.fixture(params=sorted(PATHS))
def deliver(request) -> Deliver:
    return PATHS[request.param]


def days_pass(nl, address: str, days: int) -> None:
    """The reader's last bounce moved DAYS into the past."""
    with nl.sessions.begin() as session:
        reader = session.scalar(select(Subscriber).where(Subscriber.email_key == address))
        reader.last_bounce_at -= timedelta(days=days)


def status_of(nl, address: str) -> Subscriber:
    with nl.sessions() as session:
        found = session.scalar(select(Subscriber).where(Subscriber.email_key == address))
        assert found is not None
        return found


def sent_post(run, smtp: SMTPSink, feed: Path, *readers: str) -> dict[str, Caught]:
    """READERS confirmed, a post published and sent; each reader's notification as the SMTP server got it."""
    run("posts", "fetch")
    for address in readers:
        run("subscribers", "add", address, "--confirmed")
    publish(feed, "The new crane", "crane")
    assert run("send").exit_code == 0
    return {address: smtp.to(address)[-1] for address in readers}


def postfix_dsn(notification: Caught, action: str = "failed", status: str = "5.1.1", words: str = "") -> bytes:
    """A delivery status notification in the layout Postfix's bounce daemon writes."""
    reader = notification.recipients[0]
    boundary = "3F0A21C0B2.1733220000/mx.harbour-notes.example"
    words = words or f"smtp; 550 5.1.1 <{reader}>: Recipient address rejected: User unknown in virtual mailbox table"
    subject = "Undelivered Mail Returned to Sender" if action == "failed" else "Delayed Mail (still being retried)"
    headers = notification.raw.split(b"\r\n\r\n", 1)[0].decode()
    return f"""Return-Path: <>
Delivered-To: {notification.sender}
Received: by mx.harbour-notes.example (Postfix) id 3F0A21C0B2; Thu,  3 Dec 2026 10:00:05 +0000 (UTC)
Date: {formatdate()}
From: MAILER-DAEMON@mx.harbour-notes.example (Mail Delivery System)
Subject: {subject}
To: {notification.sender}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="{boundary}"
Content-Transfer-Encoding: 8bit
Message-Id: <20261203100005.3F0A21C0B2@mx.harbour-notes.example>

This is a MIME-encapsulated message.

--{boundary}
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.harbour-notes.example.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

<{reader}>: host mx.example.org[192.0.2.25] said: {words.removeprefix("smtp; ")}
    (in reply to RCPT TO command)

--{boundary}
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.harbour-notes.example
X-Postfix-Queue-ID: 3F0A21C0B2
X-Postfix-Sender: rfc822; {notification.sender}
Arrival-Date: Thu,  3 Dec 2026 10:00:00 +0000 (UTC)

Final-Recipient: rfc822; {reader}
Original-Recipient: rfc822;{reader}
Action: {action}
Status: {status}
Remote-MTA: dns; mx.example.org
Diagnostic-Code: {words}

--{boundary}
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

{headers}
--{boundary}--
""".replace("\n", "\r\n").encode()


def exim_bounce(notification: Caught) -> bytes:
    """Exim's default bounce: plain text, not RFC 3464, with X-Failed-Recipients."""
    reader = notification.recipients[0]
    return f"""Return-path: <>
Envelope-to: {notification.sender}
Delivery-date: Thu, 03 Dec 2026 10:00:07 +0000
From: Mail Delivery System <Mailer-Daemon@mx.example.net>
To: {notification.sender}
Subject: Mail delivery failed: returning message to sender
Message-Id: <E1tIabc-0001xY-2Q@mx.example.net>
Date: Thu, 03 Dec 2026 10:00:07 +0000
Auto-Submitted: auto-replied
X-Failed-Recipients: {reader}

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  {reader}
    host mx.example.net [192.0.2.7]
    SMTP error from remote mail server after RCPT TO:<{reader}>:
    550 5.1.1 <{reader}>... User unknown

------ This is a copy of the message, including all the headers. ------

{notification.raw.decode()[:2000]}
""".encode()


def arf_report(notification: Caught, redacted: bool = False) -> bytes:
    """An RFC 5965 abuse report from a mailbox provider's feedback loop, the original attached; REDACTED
    drops the original sender and recipient, as some providers do."""
    original = notification.raw.decode()
    if redacted:
        original = re.sub(r"(?m)^To: .*$", "To: [redacted]", original)
    mail_from = "" if redacted else f"Original-Mail-From: <{notification.sender}>\r\n"
    return (
        "From: Feedback Loop <fbl@feedback.example.net>\r\n"
        "To: fbl@harbour-notes.example\r\n"
        "Subject: Abuse report\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="arf"\r\n\r\n'
        "--arf\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report for an email message received.\r\n"
        "--arf\r\nContent-Type: message/feedback-report\r\n\r\n"
        "Feedback-Type: abuse\r\nUser-Agent: ExampleFBL/1.0\r\nVersion: 1\r\n"
        f"{mail_from}Arrival-Date: {formatdate()}\r\nReported-Domain: harbour-notes.example\r\n\r\n"
        "--arf\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"
        f"{original}\r\n--arf--\r\n"
    ).encode()


def test_each_email_leaves_with_its_own_return_path_and_a_mailto_unsubscribe(run, smtp, feed) -> None:
    got = sent_post(run, smtp, feed, "ada@example.org", "ken@example.org")
    tokens = {VERP.fullmatch(mail.sender).group(1) for mail in got.values()}  # type: ignore[union-attr]
    assert len(tokens) == 2
    for mail in got.values():
        header = mail.message["List-Unsubscribe"]
        assert re.fullmatch(r"<https://news\.example\.com/unsubscribe/[^>]+>, <mailto:unsubscribe\+[^>]+>", header)
        assert mail.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert "Return-Path" not in mail.message


def test_a_permanent_bounce_from_postfix_marks_the_reader_bounced(
    nl, run, smtp, feed, config_file, tmp_path, deliver
) -> None:
    got = sent_post(run, smtp, feed, "gone@example.org", "ada@example.org")
    said = deliver(config_file, tmp_path, postfix_dsn(got["gone@example.org"]))
    assert said.startswith("bounced: reader") and "5.1.1" in said
    assert status_of(nl, "gone@example.org").status is Status.BOUNCED
    assert status_of(nl, "ada@example.org").status is Status.CONFIRMED
    [post] = json.loads(run("stats", "--json").output)["recent_posts"]
    assert (post["sent"], post["bounced"]) == (2, 1)

    publish(feed, "Another post", "another")
    smtp.clear()
    run("send")
    assert smtp.to("gone@example.org") == [] and len(smtp.to("ada@example.org")) == 1


def test_an_exim_bounce_without_a_delivery_report_is_understood_too(
    nl, run, smtp, feed, config_file, tmp_path, deliver
) -> None:
    got = sent_post(run, smtp, feed, "gone@example.net")
    assert deliver(config_file, tmp_path, exim_bounce(got["gone@example.net"])).startswith("bounced:")
    assert status_of(nl, "gone@example.net").status is Status.BOUNCED


def test_temporary_failures_count_once_a_day_and_bounce_the_reader_at_three(
    nl, run, smtp, feed, config_file, tmp_path, deliver
) -> None:
    got = sent_post(run, smtp, feed, "full@example.org")
    delayed = postfix_dsn(got["full@example.org"], "delayed", "4.4.7", "smtp; 451 4.4.7 mailbox temporarily busy")
    assert "score 1 of 3" in deliver(config_file, tmp_path, delayed)
    assert "already counted today" in deliver(config_file, tmp_path, delayed)
    full = postfix_dsn(got["full@example.org"], "failed", "5.2.2", "smtp; 552 5.2.2 Mailbox full")
    for score in (2, 3):
        days_pass(nl, "full@example.org", 1)
        said = deliver(config_file, tmp_path, full)
        if score < 3:
            assert f"score {score} of 3" in said and status_of(nl, "full@example.org").status is Status.CONFIRMED
    assert said.startswith("bounced:") and status_of(nl, "full@example.org").status is Status.BOUNCED


def test_a_soft_bounce_weeks_after_the_last_starts_the_count_again(nl, run, smtp, feed, config_file, tmp_path) -> None:
    got = sent_post(run, smtp, feed, "busy@example.org")
    delayed = postfix_dsn(got["busy@example.org"], "delayed", "4.4.7", "smtp; 451 4.4.7 try later")
    handled(inbound(config_file, delayed))
    days_pass(nl, "busy@example.org", 15)
    with nl.engine.begin() as conn:
        conn.execute(update(Subscriber).values(bounce_score=2.0))
    assert "score 1 of 3" in handled(inbound(config_file, delayed))
    assert status_of(nl, "busy@example.org").status is Status.CONFIRMED


def test_a_policy_refusal_is_not_held_against_the_reader(nl, run, smtp, feed, config_file) -> None:
    got = sent_post(run, smtp, feed, "ada@example.org")
    dmarc = postfix_dsn(
        got["ada@example.org"], "failed", "5.7.26", "smtp; 550 5.7.26 Unauthenticated email is not accepted"
    )
    said = handled(inbound(config_file, dmarc))
    assert said.startswith("policy bounce:") and status_of(nl, "ada@example.org").status is Status.CONFIRMED


def test_a_spam_complaint_unsubscribes_the_reader_for_good(nl, run, smtp, feed, config_file, tmp_path, deliver) -> None:
    got = sent_post(run, smtp, feed, "angry@example.org", "ada@example.org")
    said = deliver(config_file, tmp_path, arf_report(got["angry@example.org"]))
    assert said.startswith("complaint: reader")
    angry = status_of(nl, "angry@example.org")
    assert angry.status is Status.UNSUBSCRIBED and angry.complained_at is not None
    assert status_of(nl, "ada@example.org").status is Status.CONFIRMED

    added = run("subscribers", "add", "angry@example.org", "--confirmed")
    assert added.exit_code != 0 and "--force" in added.output
    (tmp_path / "again.csv").write_text("email\nangry@example.org\n")
    run("subscribers", "import", str(tmp_path / "again.csv"))
    assert status_of(nl, "angry@example.org").status is Status.UNSUBSCRIBED


def test_a_redacted_complaint_still_finds_its_reader_by_the_unsubscribe_links(nl, run, smtp, feed, config_file) -> None:
    got = sent_post(run, smtp, feed, "angry@example.org")
    assert handled(inbound(config_file, arf_report(got["angry@example.org"], redacted=True))).startswith("complaint:")
    assert status_of(nl, "angry@example.org").status is Status.UNSUBSCRIBED


def test_an_email_to_the_mailto_unsubscribe_address_unsubscribes(
    nl, run, smtp, feed, config_file, tmp_path, deliver
) -> None:
    got = sent_post(run, smtp, feed, "leaving@example.org", "ada@example.org")
    mailto = re.search(r"<mailto:([^>]+)>", got["leaving@example.org"].message["List-Unsubscribe"]).group(1)  # type: ignore[union-attr]
    raw = f"From: leaving@example.org\r\nTo: {mailto}\r\nSubject: please\r\n\r\nwhatever the body says\r\n".encode()
    assert deliver(config_file, tmp_path, raw).startswith("unsubscribed: reader")
    assert status_of(nl, "leaving@example.org").status is Status.UNSUBSCRIBED
    assert status_of(nl, "ada@example.org").status is Status.CONFIRMED


def test_the_envelope_recipient_from_the_mta_is_enough(nl, run, smtp, feed, config_file) -> None:
    got = sent_post(run, smtp, feed, "leaving@example.org")
    mailto = re.search(r"<mailto:([^>]+)>", got["leaving@example.org"].message["List-Unsubscribe"]).group(1)  # type: ignore[union-attr]
    raw = b"From: leaving@example.org\r\nTo: undisclosed-recipients:;\r\nSubject: Unsubscribe\r\n\r\n\r\n"
    assert handled(inbound(config_file, raw, env={"ORIGINAL_RECIPIENT": mailto})).startswith("unsubscribed:")
    assert status_of(nl, "leaving@example.org").status is Status.UNSUBSCRIBED


def test_vacation_replies_are_ignored(nl, run, smtp, feed, config_file, tmp_path, deliver) -> None:
    got = sent_post(run, smtp, feed, "away@example.org")
    to = got["away@example.org"].sender
    for headers in (
        "Auto-Submitted: auto-replied\r\nSubject: Re: The new crane",
        "Subject: Out of Office: The new crane",
        "Subject: Automatic reply: The new crane\r\nX-Auto-Response-Suppress: All",
    ):
        raw = f"From: away@example.org\r\nTo: {to}\r\n{headers}\r\n\r\nI am away until Monday.\r\n".encode()
        assert deliver(config_file, tmp_path, raw).startswith("ignored: an automatic reply")
    away = status_of(nl, "away@example.org")
    assert away.status is Status.CONFIRMED and away.bounce_score == 0


def test_forged_stale_and_missing_tokens_change_nothing(nl, run, smtp, feed, config_file, tmp_path, deliver) -> None:
    got = sent_post(run, smtp, feed, "ada@example.org")
    real = VERP.fullmatch(got["ada@example.org"].sender).group(1)  # type: ignore[union-attr]
    forged = real[:-4] + ("aaaa" if not real.endswith("aaaa") else "bbbb")
    other_row = re.sub(r"^d[0-9]+", "d999999", real)
    for raw in (
        postfix_dsn(got["ada@example.org"]).replace(real.encode(), forged.encode()),
        postfix_dsn(got["ada@example.org"]).replace(real.encode(), other_row.encode()),
        f"To: unsubscribe+{forged}@news.example.com\r\nSubject: unsubscribe\r\n\r\n".encode(),
        b"To: bounces@news.example.com\r\nSubject: hello\r\n\r\nno token here\r\n",
        b"\x00\xff garbage that is no email at all \r\n\r\n\xfe",
    ):
        assert deliver(config_file, tmp_path, raw).startswith("ignored:")
    assert status_of(nl, "ada@example.org").status is Status.CONFIRMED


def test_a_database_that_cannot_be_used_asks_the_mta_to_retry(config_file: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    text = config_file.read_text()
    broken.write_text(re.sub(r'(?m)^url = ".*"$', f'url = "sqlite:///{tmp_path}/no/such/folder/x.db"', text))
    result = inbound(broken, b"To: bounces@news.example.com\r\nSubject: hello\r\n\r\n")
    assert result.returncode == 75, result.stderr
    assert b"Traceback" not in result.stderr and b"retry" in result.stderr
