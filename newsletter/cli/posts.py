"""`newsletter posts …` and `newsletter send`."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import json
import sys
import textwrap
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import click

from .. import db, digests, dispatch
from .. import posts as post_service
from ..dispatch import SendReport
from ..feeds import FeedError
from ..mailer import MailerError, Outcome
from ..models import Post, utcnow
from ..runtime import Newsletter
from ..subscriptions import InvalidAddress, normalize
from .base import Failure, State, pass_state, stop_exit_code

PROGRESS_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal
LABEL_WIDTH = 40


@click.group()
def posts() -> None:
    """Posts from the blog's feed, or added by hand.

    \b
    Examples:
      $ newsletter posts fetch
      $ newsletter posts add --title "Hello" --url https://blog.example.com/hello/
      $ newsletter posts list
      $ newsletter posts preview 3 --text
      $ newsletter posts approve 3
      $ newsletter posts skip 3
    """


def fetch_feed(nl: Newsletter, announce_existing: bool = False, outcome: str = "nothing was recorded") -> list[Post]:
    try:
        return post_service.fetch_feed(nl, announce_existing)
    except FeedError as exc:
        raise Failure(f"{exc}; {outcome}") from None


@posts.command("fetch")
@click.option(
    "--announce-existing",
    is_flag=True,
    help="On the first fetch, announce the posts already in the feed too (normally they are not).",
)
@pass_state
def posts_fetch(state: State, announce_existing: bool) -> None:
    """Record new entries of the feed ([site] feed_url).

    \b
    Example:
      $ newsletter posts fetch
      2 new post(s), 2 marked as already announced (first fetch of the feed)
    """
    new = fetch_feed(state.newsletter(), announce_existing)
    quiet = [p for p in new if p.announced]
    line = f"{len(new)} new post(s)"
    if quiet:
        line += f", {len(quiet)} marked as already announced (first fetch of the feed)"
    click.echo(line)


@posts.command("add")
@click.option("--title", required=True, help="Post title (the email's subject).")
@click.option("--url", required=True, help="Link to the post.")
@click.option("--summary", default="", help="Summary shown in the email (plain text or HTML).")
@pass_state
def posts_add(state: State, title: str, url: str, summary: str) -> None:
    """Add a post by hand; the next `newsletter send` announces it.

    \b
    Example:
      $ newsletter posts add --title "Hello" --url https://blog.example.com/hello/
      added post 3: Hello
    """
    try:
        post = post_service.add_post(state.newsletter(), title, url, summary)
    except post_service.InvalidPost as exc:
        raise Failure(str(exc)) from None
    click.echo(f"added post {post.id}: {post.title}")


@posts.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array of the posts instead.")
@pass_state
def posts_list(state: State, as_json: bool) -> None:
    """Show posts, newest first, their state (new, awaiting approval, sending, announced or skipped) and
    categories.

    \b
    Examples:
      $ newsletter posts list
      $ newsletter posts list --json
    """
    posts = post_service.all_posts(state.newsletter())
    if as_json:
        click.echo(json.dumps([_post_json(post) for post in posts], ensure_ascii=False, indent=2))
        return
    width = max((len(post.state) for post in posts), default=0)
    for post in posts:
        date = post.published_at.strftime("%Y-%m-%d") if post.published_at else "          "
        tags = f"  [{', '.join(post.categories)}]" if post.categories else ""
        click.echo(f"{post.id:>5}  {date}  {post.state:<{width}}  {post.title}  <{post.url}>{tags}")


def _post_json(post: Post) -> dict[str, Any]:
    return {
        "id": post.id,
        "title": post.title,
        "url": post.url,
        "published_at": post.published_at.isoformat() if post.published_at else None,
        "state": post.state,
        "categories": list(post.categories or []),
    }


@posts.command("preview")
@click.argument("post_id", metavar="ID", type=int)
@click.option(
    "--html",
    "html_file",
    metavar="FILE",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write the HTML part to FILE (open it in a browser).",
)
@click.option("--text", "text_only", is_flag=True, help="Print the plain-text part only.")
@pass_state
def posts_preview(state: State, post_id: int, html_file: Path | None, text_only: bool) -> None:
    """Print the email about post ID exactly as a reader gets it (RFC 5322). Its links are for no reader:
    the unsubscribe page's button changes nothing, and the manage link says the link does not work.

    \b
    Examples:
      $ newsletter posts preview 3 > post.eml
      $ newsletter posts preview 3 --text
      $ newsletter posts preview 3 --html post.html
    """
    if html_file is not None and text_only:
        raise Failure("--html FILE and --text are two different previews: give one of them")
    try:
        message = post_service.render_notification(state.newsletter(), post_id)
    except post_service.PostError as exc:
        raise Failure(str(exc)) from None
    if html_file is None and not text_only:
        sys.stdout.flush()
        sys.stdout.buffer.write(message)
        return
    parsed = email.message_from_bytes(message, _class=EmailMessage, policy=email.policy.default)
    part = parsed.get_body(("plain",) if text_only else ("html",))
    content = part.get_content().replace("\r\n", "\n") if part is not None else ""
    if text_only:
        click.echo(content, nl=False)
        return
    assert html_file is not None
    try:
        html_file.write_text(content, encoding="utf-8")
    except OSError as exc:
        raise Failure(f"--html {html_file}: {exc.strerror or exc}") from None
    click.echo(f"wrote the HTML part of post {post_id} to {html_file}")


@posts.command("approve")
@click.argument("post_id", metavar="ID", type=int)
@pass_state
def posts_approve(state: State, post_id: int) -> None:
    """Let the next `newsletter send` announce post ID, which awaits approval ([site] require_approval).

    \b
    Example:
      $ newsletter posts approve 5
      approved post 5: Storm warning for the weekend
    """
    try:
        post = post_service.approve_post(state.newsletter(), post_id)
    except post_service.PostError as exc:
        raise Failure(str(exc)) from None
    click.echo(f"approved post {post.id}: {post.title}")


@posts.command("skip")
@click.argument("post_id", metavar="ID", type=int)
@pass_state
def posts_skip(state: State, post_id: int) -> None:
    """Never send post ID: neither by email nor in a digest. A post being sent stops going out (readers who
    already got it keep it).

    \b
    Example:
      $ newsletter posts skip 5
      skipped post 5: Storm warning for the weekend
    """
    try:
        post, stopped = post_service.skip_post(state.newsletter(), post_id)
    except post_service.PostError as exc:
        raise Failure(str(exc)) from None
    line = f"skipped post {post.id}: {post.title}"
    if stopped:
        line += f"; {stopped} reader(s) not reached yet will not get it"
    click.echo(line)


@click.command()
@click.option("--no-fetch", is_flag=True, help="Do not fetch the feed first.")
@click.option("--dry-run", is_flag=True, help="Show what would be sent; send and record nothing.")
@click.option("--to", "to_address", metavar="ADDRESS", help="Send a copy of the latest post to ADDRESS only.")
@click.option("--post", "post_id", metavar="ID", type=int, help="With --to: send post ID instead of the latest.")
@click.option(
    "--digest",
    type=click.Choice(["daily", "weekly"]),
    help="With --to: send a sample daily or weekly digest (of the last day's or week's posts) instead.",
)
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Send again what the SMTP server refused for good (and mark those readers confirmed again).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object instead.")
@pass_state
def send(
    state: State,
    no_fetch: bool,
    dry_run: bool,
    to_address: str | None,
    post_id: int | None,
    digest: str | None,
    retry_failed: bool,
    as_json: bool,
) -> None:
    """Email every confirmed subscriber about each post not yet announced (except posts skipped or awaiting
    approval): readers on instant email at once, the others in the daily or weekly digests that are due
    ([digest] in the config).

    Safe to run again at any time (cron, every 15 minutes): nobody gets a post twice, a digest goes out
    once per day or week, and an interrupted run is finished by the next one. On PostgreSQL several
    senders can run at once and share the work.

    \b
    Examples:
      $ newsletter send
      1 post(s): 2 sent, 0 failed, 0 skipped, 0 left for the next run
      $ newsletter send --dry-run
      $ newsletter send --to me@example.com
      $ newsletter send --to me@example.com --post 3
      $ newsletter send --to me@example.com --digest weekly
      $ newsletter send --json
    """
    nl = state.newsletter()
    if digest is not None and to_address is None:
        raise Failure("--digest goes with --to ADDRESS: it sends a sample digest to that address")
    if post_id is not None and (to_address is None or digest is not None):
        raise Failure("--post goes with --to ADDRESS (and not --digest): it sends a copy of that post to that address")
    if as_json and (to_address is not None or dry_run):
        raise Failure("--json prints the summary of a send: it does not go with --to or --dry-run")
    if to_address is not None:
        _send_test_copy(nl, to_address, dry_run, digest, post_id)
        return
    if dry_run:
        _dry_run(nl, no_fetch)
        return
    try:
        with db.sender_lock(nl.engine) as sender_id:
            if not no_fetch:
                fetch_feed(nl, outcome="nothing was sent")
            if retry_failed:
                click.echo(f"{dispatch.retry_failed(nl)} failed deliveries queued again", err=as_json)
            report = _send_with_progress(nl, sender_id)
    except db.SenderBusy as exc:
        raise Failure(str(exc)) from None
    except KeyboardInterrupt as interrupt:
        raise Failure(
            "interrupted; what was sent is recorded: run `newsletter send` again to finish", stop_exit_code(interrupt)
        ) from None
    for failure in report.failures:
        click.echo(f"failed: {failure}", err=True)
    click.echo(_report_json(report) if as_json else report.summary())
    if report.stopped_by is not None:
        sys.exit(stop_exit_code(report.stopped_by))
    if report.error:
        sys.exit(1)


def _report_json(report: SendReport) -> str:
    fields = {f.name: getattr(report, f.name) for f in dataclasses.fields(report) if f.name != "stopped_by"}
    return json.dumps({**fields, "interrupted": report.stopped_by is not None}, ensure_ascii=False, indent=2)


def _label(title: str) -> str:
    """TITLE cut to LABEL_WIDTH characters at a word boundary (a first word longer than that is cut)."""
    short = textwrap.shorten(title, LABEL_WIDTH, placeholder=" …")
    return short if short != "…" else title[: LABEL_WIDTH - 1] + "…"


class _ProgressLines:
    """Progress for logs (cron, systemd): a line on stderr at most every PROGRESS_EVERY seconds."""

    def __init__(self) -> None:
        self.title, self.total, self.done = "", 0, 0
        self.started = self.printed = time.monotonic()

    def on_post(self, title: str, total: int) -> None:
        self.title, self.total, self.done, self.started = title, total, 0, time.monotonic()

    def update(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.printed < PROGRESS_EVERY:
            return
        self.printed = now
        percent = f" ({self.done * 100 // self.total}%)" if self.total else ""
        rate = self.done / (now - self.started) if now > self.started else 0.0
        click.echo(f'sending "{self.title}": {self.done:,}/{self.total:,}{percent}, {rate:,.0f}/s', err=True)


def _send_with_progress(nl: Newsletter, sender_id: int) -> SendReport:
    if not sys.stderr.isatty():
        lines = _ProgressLines()
        return dispatch.send(nl, sender_id, progress=lines.update, on_post=lines.on_post)
    bars: list = []
    started: list[float] = []

    def rate(_item: object) -> str:
        elapsed = time.monotonic() - started[-1]
        return f"{bars[-1].pos / elapsed:,.0f}/s" if elapsed > 0 else ""

    def on_post(title: str, total: int) -> None:
        if bars:
            bars[-1].render_finish()
        started.append(time.monotonic())
        bars.append(
            click.progressbar(
                length=total,
                label=_label(title),
                file=sys.stderr,
                show_pos=True,
                show_eta=True,
                item_show_func=rate,
            )
        )

    report = dispatch.send(nl, sender_id, progress=lambda n: bars[-1].update(n) if bars else None, on_post=on_post)
    if bars:
        bars[-1].render_finish()
    return report


def _dry_run(nl: Newsletter, no_fetch: bool) -> None:
    try:
        preview = post_service.preview(nl, fetch=not no_fetch)
    except FeedError as exc:
        raise Failure(str(exc)) from None
    if preview.first_fetch:
        click.echo(f"first fetch of the feed: its {preview.first_fetch} entries would be marked as already announced")
    for title in preview.titles:
        click.echo(f"would announce: {title}")
    click.echo(f"dry run: {len(preview.titles)} post(s) to {preview.recipients} confirmed subscriber(s); nothing sent")
    due = digests.upcoming(nl, utcnow(), len(preview.titles)).readers
    if due:
        kinds = ", ".join(f"{count} {frequency}" for frequency, count in sorted(due.items()))
        click.echo(f"dry run: digests due now: {kinds}; nothing sent")


def _send_test_copy(
    nl: Newsletter, address: str, dry_run: bool = False, digest: str | None = None, post_id: int | None = None
) -> None:
    try:
        recipient = normalize(address)
    except InvalidAddress as exc:
        raise Failure(f"--to {address!r}: {exc}") from None
    try:
        post = post_service.latest_post(nl) if post_id is None else post_service.get_post(nl, post_id)
    except post_service.PostError as exc:
        raise Failure(f"--post {post_id}: {exc}") from None
    if post is None:
        raise Failure("there are no posts yet; run `newsletter posts fetch` or `newsletter posts add`")
    what = f"a sample {digest} digest" if digest else f'a copy of "{post.title}"'
    if dry_run:
        click.echo(f"dry run: would send {what} to {recipient.normalized}; nothing sent")
        return
    to = recipient.ascii_email or recipient.normalized
    try:
        if digest:
            result, posts = dispatch.send_sample_digest(nl, digest, to)
            what += f" of {len(posts)} post(s)"
        else:
            result = dispatch.send_copy(nl, post, to)
    except MailerError as exc:
        raise Failure(f"SMTP server {nl.config.smtp.host}:{nl.config.smtp.port}: {exc}") from None
    if result.outcome is not Outcome.SENT:
        raise Failure(f"not sent: {result.reply}")
    click.echo(f"sent {what} to {recipient.normalized} (nothing recorded)")
