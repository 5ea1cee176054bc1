"""`newsletter posts …` and `newsletter send`."""

from __future__ import annotations

import sys
import time

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


@click.group()
def posts() -> None:
    """Posts from the blog's feed, or added by hand.

    \b
    Examples:
      $ newsletter posts fetch
      $ newsletter posts add --title "Hello" --url https://blog.example.com/hello/
      $ newsletter posts list
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
@pass_state
def posts_list(state: State) -> None:
    """Show posts, newest first, whether each was announced, and their categories.

    \b
    Example:
      $ newsletter posts list
    """
    for post in post_service.all_posts(state.newsletter()):
        state_text = "announced" if post.announced else "sending" if post.queued_at else "new"
        date = post.published_at.strftime("%Y-%m-%d") if post.published_at else "          "
        tags = f"  [{', '.join(post.categories)}]" if post.categories else ""
        click.echo(f"{post.id:>5}  {date}  {state_text:<9}  {post.title}  <{post.url}>{tags}")


@click.command()
@click.option("--no-fetch", is_flag=True, help="Do not fetch the feed first.")
@click.option("--dry-run", is_flag=True, help="Show what would be sent; send and record nothing.")
@click.option("--to", "to_address", metavar="ADDRESS", help="Send a copy of the latest post to ADDRESS only.")
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
@pass_state
def send(
    state: State, no_fetch: bool, dry_run: bool, to_address: str | None, digest: str | None, retry_failed: bool
) -> None:
    """Email every confirmed subscriber about each post not yet announced: readers on instant email at
    once, the others in the daily or weekly digests that are due ([digest] in the config).

    Safe to run again at any time (cron, every 15 minutes): nobody gets a post twice, a digest goes out
    once per day or week, and an interrupted run is finished by the next one. On PostgreSQL several
    senders can run at once and share the work.

    \b
    Examples:
      $ newsletter send
      1 post(s): 2 sent, 0 failed, 0 skipped, 0 left for the next run
      $ newsletter send --dry-run
      $ newsletter send --to me@example.com
      $ newsletter send --to me@example.com --digest weekly
    """
    nl = state.newsletter()
    if digest is not None and to_address is None:
        raise Failure("--digest goes with --to ADDRESS: it sends a sample digest to that address")
    if to_address is not None:
        _send_test_copy(nl, to_address, dry_run, digest)
        return
    if dry_run:
        _dry_run(nl, no_fetch)
        return
    try:
        with db.sender_lock(nl.engine) as sender_id:
            if not no_fetch:
                fetch_feed(nl, outcome="nothing was sent")
            if retry_failed:
                click.echo(f"{dispatch.retry_failed(nl)} failed deliveries queued again")
            report = _send_with_progress(nl, sender_id)
    except db.SenderBusy as exc:
        raise Failure(str(exc)) from None
    except KeyboardInterrupt as interrupt:
        raise Failure(
            "interrupted; what was sent is recorded: run `newsletter send` again to finish", stop_exit_code(interrupt)
        ) from None
    for failure in report.failures:
        click.echo(f"failed: {failure}", err=True)
    click.echo(report.summary())
    if report.stopped_by is not None:
        sys.exit(stop_exit_code(report.stopped_by))
    if report.error:
        sys.exit(1)


def _send_with_progress(nl: Newsletter, sender_id: int) -> SendReport:
    if not sys.stderr.isatty():
        return dispatch.send(nl, sender_id)
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
                label=title[:40],
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


def _send_test_copy(nl: Newsletter, address: str, dry_run: bool = False, digest: str | None = None) -> None:
    try:
        recipient = normalize(address)
    except InvalidAddress as exc:
        raise Failure(f"--to {address!r}: {exc}") from None
    post = post_service.latest_post(nl)
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
