"""What the owner reads: `subscribers list` and `stats`, for people and for scripts (--json), and
`subscribers add --invite`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from newsletter import manage
from newsletter.models import Status, Subscriber
from newsletter.subscriptions import Requester, unsubscribe

from .conftest import SMTPSink, publish
from .test_cli import failure, newsletter


def printed(result) -> list[str]:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout.splitlines()


def reader(nl, address: str) -> Subscriber:
    with nl.sessions() as session:
        found = session.scalar(select(Subscriber).where(Subscriber.email_key == address))
        assert found is not None
        return found


def leave(nl, address: str) -> None:
    with nl.sessions.begin() as session:
        subscriber = session.scalar(select(Subscriber).where(Subscriber.email_key == address))
        unsubscribe(subscriber, Requester(ip="192.0.2.7", user_agent="a mail app"))


def test_list_filters_by_text_and_day_and_ends_with_the_total(nl, run, config_file: Path) -> None:
    for address in ("ada@harbour.example", "Bob@Harbour.example", "ken@elsewhere.example"):
        run("subscribers", "add", address, "--confirmed")
    run("subscribers", "add", "mo@harbour.example")
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")

    assert printed(newsletter(config_file, "subscribers", "list", "--search", "HARBOUR", "--status", "confirmed")) == [
        f"ada@harbour.example  confirmed  {today}",
        f"Bob@harbour.example  confirmed  {today}",
        "2 subscribers",
    ]
    assert printed(newsletter(config_file, "subscribers", "list", "--search", "ken@")) == [
        f"ken@elsewhere.example  confirmed  {today}",
        "1 subscriber",
    ]
    assert printed(newsletter(config_file, "subscribers", "list", "--since", today))[-1] == "4 subscribers"
    assert printed(newsletter(config_file, "subscribers", "list", "--since", tomorrow)) == ["0 subscribers"]
    assert printed(newsletter(config_file, "subscribers", "list", "--search", "%")) == ["0 subscribers"]
    assert "--search" in failure(newsletter(config_file, "subscribers", "list", "--search", "\udcff"))


def test_list_json_is_one_document_with_iso_dates(nl, run, config_file: Path) -> None:
    run("subscribers", "add", "ada@example.com", "--confirmed")
    run("subscribers", "add", "ken@example.com")
    leave(nl, "ada@example.com")
    result = newsletter(config_file, "subscribers", "list", "--json")
    document = json.loads(result.stdout)
    assert document["total"] == 2
    ada, ken = document["subscribers"]
    assert (ada["email"], ada["status"], ada["frequency"]) == ("ada@example.com", "unsubscribed", "instant")
    assert datetime.fromisoformat(ada["unsubscribed_at"]) == reader(nl, "ada@example.com").unsubscribed_at
    assert datetime.fromisoformat(ken["subscribed_at"]).date() == datetime.now(UTC).date()
    assert (ken["status"], ken["confirmed_at"], ken["unsubscribed_at"]) == ("unconfirmed", None, None)
    none = json.loads(newsletter(config_file, "subscribers", "list", "--json", "--search", "nobody").stdout)
    assert none == {"subscribers": [], "total": 0}


def test_stats_shows_growth_and_how_each_post_went(nl, run, smtp: SMTPSink, feed, config_file: Path) -> None:
    smtp.reply = lambda rcpt: "550 5.1.1 No such user" if rcpt.startswith("gone") else None
    run("posts", "fetch")
    for address in ("ada@example.com", "gone@example.com", "leaver@example.com", "ken@example.com"):
        run("subscribers", "add", address, "--confirmed")
    run("subscribers", "add", "new@example.com")
    with nl.sessions.begin() as session:
        session.scalars(select(Subscriber).where(Subscriber.email_key == "ken@example.com")).one().frequency = "weekly"
    publish(feed, "Gale on Sunday", "gale")
    assert "1 digest(s): 3 sent, 1 failed" in run("send").output
    leave(nl, "leaver@example.com")

    document = json.loads(newsletter(config_file, "stats", "--json").stdout)
    assert document["subscribers"] == {"unconfirmed": 1, "confirmed": 2, "unsubscribed": 1, "bounced": 1}
    assert document["confirmed_by_frequency"] == {"instant": 1, "daily": 0, "weekly": 1}
    assert len(document["growth"]) == 8
    this_week = document["growth"][-1]
    assert (this_week["confirmed"], this_week["left"]) == (4, 1)
    assert datetime.fromisoformat(this_week["week"]).weekday() == 0
    assert all(week["confirmed"] == week["left"] == 0 for week in document["growth"][:-1])
    [post] = document["recent_posts"]
    assert post["title"] == "Gale on Sunday"
    assert (post["sent"], post["failed"], post["bounced"], post["unsubscribed_within_7_days"]) == (3, 1, 1, 1)

    human = printed(newsletter(config_file, "stats"))
    assert "confirmed by frequency: 1 instant, 0 daily, 1 weekly" in human
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert f"  {today}  Gale on Sunday: 3 sent, 1 failed (1 bounced), 1 unsubscribed" in human


def test_add_without_invite_says_no_email_was_sent(nl, smtp: SMTPSink, config_file: Path) -> None:
    assert printed(newsletter(config_file, "subscribers", "add", "ada@example.com")) == [
        "added ada@example.com (unconfirmed): no email was sent; run with --invite to send a confirmation email"
    ]
    assert smtp.messages == []


def test_invite_sends_the_confirmation_email_of_the_form(nl, run, smtp: SMTPSink, config_file: Path) -> None:
    assert printed(newsletter(config_file, "subscribers", "add", "friend@example.com", "--invite")) == [
        "added friend@example.com (unconfirmed): sent a confirmation email"
    ]
    assert smtp.subjects("friend@example.com") == ["Confirm your subscription to Harbour Notes"]
    assert reader(nl, "friend@example.com").status == Status.UNCONFIRMED

    run("subscribers", "add", "ada@example.com")
    assert printed(newsletter(config_file, "subscribers", "add", "ada@example.com", "--invite")) == [
        "already there: ada@example.com (unconfirmed): sent a confirmation email"
    ]
    assert smtp.subjects("ada@example.com") == ["Confirm your subscription to Harbour Notes"]


def test_invite_keeps_who_left_as_they_are(nl, run, smtp: SMTPSink, config_file: Path) -> None:
    run("subscribers", "add", "left@example.com", "--confirmed")
    leave(nl, "left@example.com")
    line = printed(newsletter(config_file, "subscribers", "add", "left@example.com", "--invite"))
    assert line == ["already there: left@example.com (unsubscribed): sent a confirmation email"]
    assert reader(nl, "left@example.com").status == Status.UNSUBSCRIBED

    run("subscribers", "add", "bounced@example.com", "--confirmed")
    with nl.sessions.begin() as session:
        session.scalars(
            select(Subscriber).where(Subscriber.email_key == "bounced@example.com")
        ).one().status = Status.BOUNCED
    assert printed(newsletter(config_file, "subscribers", "add", "bounced@example.com", "--invite")) == [
        "already there: bounced@example.com (bounced): no email was sent (their address bounced)"
    ]
    assert smtp.to("bounced@example.com") == []
    assert reader(nl, "bounced@example.com").status == Status.BOUNCED


def test_invite_of_an_erased_address_is_refused(nl, run, smtp: SMTPSink, config_file: Path) -> None:
    run("subscribers", "add", "gone@example.com", "--confirmed")
    with nl.sessions.begin() as session:
        manage.erase(session, nl, session.scalars(select(Subscriber)).one())
    line = failure(newsletter(config_file, "subscribers", "add", "gone@example.com", "--invite"))
    assert "erased at the reader's request" in line
    assert smtp.messages == []
    assert printed(newsletter(config_file, "subscribers", "list")) == ["0 subscribers"]


def test_invite_stops_at_the_daily_limit_per_address(nl, smtp: SMTPSink, config_file: Path) -> None:
    assert printed(newsletter(config_file, "subscribers", "add", "ada@example.com", "--invite"))[0].endswith(
        "sent a confirmation email"
    )
    again = printed(newsletter(config_file, "subscribers", "add", "ada@example.com", "--invite"))
    assert again == [
        "already there: ada@example.com (unconfirmed): no email was sent (one went out in the last 10 minutes, "
        "or 3 today)"
    ]
    assert len(smtp.to("ada@example.com")) == 1


def test_invite_with_the_mail_server_down_leaves_it_to_the_worker(nl, config_file: Path) -> None:
    result = newsletter(config_file, "subscribers", "add", "ada@example.com", "--invite")
    [line] = printed(result)
    assert line.startswith("added ada@example.com (unconfirmed): a confirmation email is queued; the worker sends it")


def test_invite_and_confirmed_exclude_each_other(nl, config_file: Path) -> None:
    line = failure(newsletter(config_file, "subscribers", "add", "ada@example.com", "--invite", "--confirmed"))
    assert "--confirmed" in line and "--invite" in line
    assert printed(newsletter(config_file, "subscribers", "list")) == ["0 subscribers"]
