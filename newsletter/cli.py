"""The `newsletter` command."""

from __future__ import annotations

import csv
import logging
import re
import sys
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

import click
from flask import Flask, render_template
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from . import db
from .app import Newsletter, create_app
from .config import ConfigError, load_config
from .dispatch import SendReport
from .feeds import FeedError, new_entries, read_feed, record_entries
from .signing import load_signer
from .models import Post, Status, Subscriber, utcnow
from .sanitize import clean_html, plain_to_html
from .serving import CAN_FORK, default_processes
from .subscriptions import (EXPORT_COLUMNS, InvalidAddress, Requester, add, export_row, find, import_row, normalize,
                            remove)

F = TypeVar("F", bound=Callable[..., object])


class Failure(click.ClickException):
    """Ends the command with one line on stderr and a non-zero status."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class State:
    """Builds the app on first use, so --help and bad configuration never need a database."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._app: Flask | None = None

    def app(self, check_schema: bool = True) -> Flask:
        if self._app is None:
            try:
                config = load_config(self.config_path)
                app = create_app(config)
                if check_schema:
                    db.require_current_schema(app.extensions["newsletter"].engine)
                    load_signer(config)
            except (ConfigError, db.DatabaseError) as exc:
                raise Failure(str(exc), exit_code=2) from None
            click.get_current_context().with_resource(app.app_context())
            self._app = app
        return self._app

    def newsletter(self, check_schema: bool = True) -> Newsletter:
        return self.app(check_schema).extensions["newsletter"]


pass_state = click.make_pass_decorator(State)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="PATH", type=click.Path(dir_okay=False),
              help="Configuration file. Default: $NEWSLETTER_CONFIG, else ./config.toml.")
@click.version_option(package_name="newsletter")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """Email subscriptions for a blog: sign-up with double opt-in, new-post notifications, one-click unsubscribe.

    \b
    Examples:
      Try it with no setup:   newsletter demo
      Real install:           cp config.example.toml config.toml   (then edit it)
                              newsletter db upgrade
                              newsletter serve
      Announce new posts:     newsletter send
    """
    ctx.obj = State(config_path)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mail.log"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # a warning for every request queued under load


# ---- database -------------------------------------------------------------------------------------

@cli.group("db")
def db_group() -> None:
    """Create or update the database schema.

    \b
    Example:
      $ newsletter db upgrade
    """


@db_group.command("upgrade")
@pass_state
def db_upgrade(state: State) -> None:
    """Bring the database (empty or older) to the latest schema.

    \b
    Example:
      $ newsletter db upgrade
      database upgraded from (empty) to 0001
    """
    nl = state.newsletter(check_schema=False)
    try:
        before, after = db.upgrade(nl.engine)
    except db.DatabaseError as exc:
        raise Failure(str(exc), exit_code=2) from None
    if before == after:
        click.echo(f"database already at the latest schema ({after})")
    else:
        click.echo(f"database upgraded from {before or '(empty)'} to {after}")


# ---- web and workers ------------------------------------------------------------------------------

@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option("--processes", type=click.IntRange(1, 64), default=default_processes(),
              show_default="2 per CPU, at most 8",
              help="Web processes sharing the port (1 where the system cannot fork).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Request threads per process (more threads in one process mostly wait for each other).")
@click.option("--no-worker", is_flag=True,
              help="Do not record sign-ups or deliver outbox mail here (run `newsletter worker`).")
@pass_state
def serve(state: State, host: str, port: int, processes: int, threads: int, no_worker: bool) -> None:
    """Run the subscribe pages with waitress, recording sign-ups and delivering their mail in the background.

    With more than one process, the web processes share the port and the worker runs in a process of its own.

    \b
    Example (behind a reverse proxy on the same host):
      $ newsletter serve --host 127.0.0.1 --port 8000
    """
    run_site(state.app(), host, port, processes if CAN_FORK else 1, threads, worker=not no_worker)


def run_site(app: Flask, host: str, port: int, processes: int, threads: int, worker: bool = True,
             before: Callable[[], None] | None = None) -> None:
    from waitress import serve as waitress_serve

    from .serving import WAITRESS_OPTIONS, listen, serve_forked
    from .worker import run_worker

    nl: Newsletter = app.extensions["newsletter"]
    if not nl.config.base_url.startswith("https://") and not nl.config.demo:
        click.echo(f"warning: [site] base_url {nl.config.base_url} is not https; links in emails will not be "
                   "encrypted", err=True)
    try:
        sock = listen(host, port)
    except OSError as exc:
        raise Failure(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --host or --port") \
            from None
    click.echo(f"Serving {nl.config.site.name} on http://{host}:{port}/ "
               f"({processes} web process{'es' if processes > 1 else ''}; Ctrl-C to stop)")
    if before:
        before()
    stop = threading.Event()
    if processes > 1:
        serve_forked(app, sock, processes, threads, background=(lambda: run_worker(app, stop)) if worker else None,
                     after_fork=lambda: nl.engine.dispose(close=False))
        return
    if worker:
        threading.Thread(target=run_worker, args=(app, stop), name="worker", daemon=True).start()
    try:
        waitress_serve(app, sockets=[sock], threads=threads, _quiet=True, **WAITRESS_OPTIONS)
    finally:
        stop.set()


@cli.command()
@click.option("--once", is_flag=True, help="Do what is due, then exit.")
@pass_state
def worker(state: State, once: bool) -> None:
    """Record sign-ups and deliver confirmation and welcome emails (when `serve --no-worker` runs the site).

    \b
    Example:
      $ newsletter worker --once
      sign-ups: 3 recorded; outbox: 3 sent, 0 deferred, 0 failed
    """
    from .mailer import MailerError
    from .worker import run_worker, work_once

    app = state.app()
    nl: Newsletter = app.extensions["newsletter"]
    if once:
        try:
            recorded, report = work_once(nl)
        except MailerError as exc:
            raise Failure(f"SMTP server {nl.config.smtp.host}:{nl.config.smtp.port}: {exc}") from None
        click.echo(f"sign-ups: {recorded} recorded; "
                   f"outbox: {report.sent} sent, {report.deferred} deferred, {report.failed} failed")
        return
    stop = threading.Event()
    click.echo("Recording sign-ups and delivering outbox mail (Ctrl-C to stop)")
    try:
        run_worker(app, stop)
    except KeyboardInterrupt:
        stop.set()


# ---- posts ----------------------------------------------------------------------------------------

@cli.group()
def posts() -> None:
    """Posts from the blog's feed, or added by hand.

    \b
    Examples:
      $ newsletter posts fetch
      $ newsletter posts add --title "Hello" --url https://blog.example.com/hello/
      $ newsletter posts list
    """


def fetch_feed(nl: Newsletter, announce_existing: bool = False) -> list[Post]:
    try:
        entries = read_feed(nl.config.site.feed_url)
    except FeedError as exc:
        raise Failure(str(exc)) from None
    try:
        with nl.sessions.begin() as session:
            return record_entries(session, entries, announce_existing)
    except IntegrityError:  # another sender recorded the same entries a moment ago
        with nl.sessions.begin() as session:
            return record_entries(session, entries, announce_existing)


@posts.command("fetch")
@click.option("--announce-existing", is_flag=True,
              help="On the first fetch, announce the posts already in the feed too (normally they are not).")
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
    from .messages import header_text

    for name, value in (("--title", title), ("--url", url), ("--summary", summary)):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Failure(f"{name} is not valid text in this terminal's encoding (UTF-8)") from None
    if not url.startswith(("https://", "http://")) or len(url) > 2048 or re.search(r"[\x00-\x20\x7f]", url):
        raise Failure(f"--url must be an http(s) URL of at most 2048 characters without spaces, not {url!r}")
    if not header_text(title):
        raise Failure("--title must not be empty")
    summary = summary.replace("\x00", "")
    html = clean_html(summary, base_url=url) if "<" in summary else plain_to_html(summary)
    nl = state.newsletter()
    with nl.sessions.begin() as session:
        if session.scalar(select(Post.id).where(Post.guid == url)):
            raise Failure(f"a post with the URL {url} already exists")
        post = Post(guid=url, url=url, title=header_text(title, 1024), summary_html=html, source="manual",
                    published_at=utcnow())
        session.add(post)
        session.flush()
        click.echo(f"added post {post.id}: {post.title}")


@posts.command("list")
@pass_state
def posts_list(state: State) -> None:
    """Show posts, newest first, and whether each was announced.

    \b
    Example:
      $ newsletter posts list
    """
    nl = state.newsletter()
    with nl.sessions() as session:
        rows = session.scalars(select(Post).order_by(Post.published_at.desc().nulls_last(), Post.id.desc()))
        for post in rows:
            state_text = ("announced" if post.announced else "sending" if post.queued_at else "new")
            date = post.published_at.strftime("%Y-%m-%d") if post.published_at else "          "
            click.echo(f"{post.id:>5}  {date}  {state_text:<9}  {post.title}  <{post.url}>")


# ---- send -----------------------------------------------------------------------------------------

@cli.command()
@click.option("--no-fetch", is_flag=True, help="Do not fetch the feed first.")
@click.option("--dry-run", is_flag=True, help="Show what would be sent; send and record nothing.")
@click.option("--to", "to_address", metavar="ADDRESS", help="Send a copy of the latest post to ADDRESS only.")
@click.option("--retry-failed", is_flag=True,
              help="Send again what the SMTP server refused for good (and mark those readers confirmed again).")
@pass_state
def send(state: State, no_fetch: bool, dry_run: bool, to_address: str | None, retry_failed: bool) -> None:
    """Email every confirmed subscriber about each post not yet announced.

    Safe to run again at any time (cron): nobody gets a post twice, and an interrupted run is finished
    by the next one. On PostgreSQL several senders can run at once and share the work.

    \b
    Examples:
      $ newsletter send
      1 post(s): 2 sent, 0 failed, 0 skipped, 0 left for the next run
      $ newsletter send --dry-run
      $ newsletter send --to me@example.com
    """
    from . import dispatch

    nl = state.newsletter()
    if to_address is not None:
        _send_test_copy(nl, to_address, dry_run)
        return
    if dry_run:
        _dry_run(nl, no_fetch)
        return
    try:
        with dispatch.sender_session(nl) as sender_id:
            if not no_fetch:
                fetch_feed(nl)
            if retry_failed:
                click.echo(f"{dispatch.retry_failed(nl)} failed deliveries queued again")
            report = _send_with_progress(nl, sender_id)
    except dispatch.SenderBusy as exc:
        raise Failure(str(exc)) from None
    except KeyboardInterrupt:
        raise Failure("interrupted; what was sent is recorded: run `newsletter send` again to finish", 130) \
            from None
    for failure in report.failures:
        click.echo(f"failed: {failure}", err=True)
    click.echo(report.summary())
    if report.error:
        sys.exit(1)


def _send_with_progress(nl: Newsletter, sender_id: int) -> SendReport:
    from . import dispatch

    if not sys.stderr.isatty():
        return dispatch.send(nl, sender_id)
    bars: list = []
    started: list[float] = []

    def rate(_item: object) -> str:
        elapsed = time.monotonic() - started[-1]
        return f"{bars[-1].pos / elapsed:,.0f}/s" if elapsed > 0 else ""

    def on_post(post: Post, total: int) -> None:
        if bars:
            bars[-1].render_finish()
        started.append(time.monotonic())
        bars.append(click.progressbar(length=total, label=post.title[:40], file=sys.stderr, show_pos=True,
                                      show_eta=True, item_show_func=rate))

    report = dispatch.send(nl, sender_id, progress=lambda n: bars[-1].update(n) if bars else None, on_post=on_post)
    if bars:
        bars[-1].render_finish()
    return report


def _dry_run(nl: Newsletter, no_fetch: bool) -> None:
    with nl.sessions() as session:
        titles = [p.title for p in session.scalars(select(Post).where(Post.announced_at.is_(None)).order_by(Post.id))]
        if not no_fetch:
            try:
                entries = read_feed(nl.config.site.feed_url)
            except FeedError as exc:
                raise Failure(str(exc)) from None
            first = session.scalar(select(Post.id).where(Post.source == "feed").limit(1)) is None
            fresh = new_entries(session, entries)
            if first and fresh:
                click.echo(f"first fetch of the feed: its {len(fresh)} entries would be marked as already announced")
            else:
                titles += [e.title for e in fresh]
        count = session.scalar(select(func.count()).select_from(Subscriber)
                               .where(Subscriber.status == Status.CONFIRMED)) or 0
    for title in titles:
        click.echo(f"would announce: {title}")
    click.echo(f"dry run: {len(titles)} post(s) to {count} confirmed subscriber(s); nothing sent")


def _send_test_copy(nl: Newsletter, address: str, dry_run: bool = False) -> None:
    from .dispatch import send_copy
    from .mailer import MailerError, Outcome

    try:
        recipient = normalize(address)
    except InvalidAddress as exc:
        raise Failure(f"--to {address!r}: {exc}") from None
    with nl.sessions() as session:
        post = session.scalar(select(Post).order_by(Post.published_at.desc().nulls_last(), Post.id.desc()).limit(1))
    if post is None:
        raise Failure("there are no posts yet; run `newsletter posts fetch` or `newsletter posts add`")
    if dry_run:
        click.echo(f"dry run: would send a copy of \"{post.title}\" to {recipient.normalized}; nothing sent")
        return
    try:
        result = send_copy(nl, post, recipient.ascii_email or recipient.normalized)
    except MailerError as exc:
        raise Failure(f"SMTP server {nl.config.smtp.host}:{nl.config.smtp.port}: {exc}") from None
    if result.outcome is not Outcome.SENT:
        raise Failure(f"not sent: {result.reply}")
    click.echo(f"sent a copy of \"{post.title}\" to {recipient.normalized} (nothing recorded)")


# ---- subscribers ----------------------------------------------------------------------------------

@cli.group()
def subscribers() -> None:
    """List, add, remove, import and export subscribers.

    \b
    Examples:
      $ newsletter subscribers add reader@example.com --confirmed
      $ newsletter subscribers list --status confirmed
      $ newsletter subscribers export > subscribers.csv
    """


@subscribers.command("list")
@click.option("--status", type=click.Choice([s.value for s in Status]), help="Only this status.")
@pass_state
def subscribers_list(state: State, status: str | None) -> None:
    """Show subscribers and their status.

    \b
    Example:
      $ newsletter subscribers list --status confirmed
      reader@example.com  confirmed  2026-11-27
    """
    nl = state.newsletter()
    query = select(Subscriber).order_by(Subscriber.id)
    if status:
        query = query.where(Subscriber.status == Status(status))
    with nl.sessions() as session:
        for sub in session.scalars(query).yield_per(1000):
            click.echo(f"{sub.email}  {sub.status.value}  {sub.created_at:%Y-%m-%d}")


@subscribers.command("add")
@click.argument("email")
@click.option("--confirmed", is_flag=True, help="Mark as confirmed (you have their consent) without an email.")
@pass_state
def subscribers_add(state: State, email: str, confirmed: bool) -> None:
    """Add a subscriber by hand.

    \b
    Example:
      $ newsletter subscribers add reader@example.com --confirmed
      added reader@example.com (confirmed)
    """
    nl = state.newsletter()
    with nl.sessions.begin() as session:
        try:
            sub, created = add(session, email, confirmed, Requester.admin())
        except InvalidAddress as exc:
            raise Failure(f"{email!r}: {exc}") from None
        click.echo(f"{'added' if created else 'already there:'} {sub.email} ({sub.status.value})")


@subscribers.command("remove")
@click.argument("email")
@pass_state
def subscribers_remove(state: State, email: str) -> None:
    """Delete a subscriber and all their personal data (consent record, deliveries, queued mail).

    \b
    Example:
      $ newsletter subscribers remove reader@example.com
      removed reader@example.com and their data
    """
    nl = state.newsletter()
    with nl.sessions.begin() as session:
        try:
            sub = find(session, email)
        except InvalidAddress as exc:
            raise Failure(f"{email!r}: {exc}") from None
        if sub is None:
            raise Failure(f"no subscriber {email!r}")
        remove(session, sub)
        click.echo(f"removed {sub.email} and their data")


@subscribers.command("import")
@click.argument("file", type=click.File("r", encoding="utf-8-sig"))
@pass_state
def subscribers_import(state: State, file) -> None:  # type: ignore[no-untyped-def]
    """Import a CSV file: a column `email`, and optionally `status` and the consent columns of an export.

    Rows without status are imported as confirmed: import only people who agreed to get your posts.
    Existing subscribers are left as they are (nobody who left is re-subscribed).

    \b
    Example:
      $ newsletter subscribers import readers.csv
      imported 2, skipped 1
        line 4: 'not-an-address': An email address must have an @-sign.
    """
    nl = state.newsletter()
    imported, skipped = 0, []
    try:
        reader = csv.DictReader(file)
        if not reader.fieldnames or "email" not in [f.strip().lower() for f in reader.fieldnames]:
            raise Failure(f"{file.name}: the first line must name the columns, with one called email")
        with nl.sessions.begin() as session:
            for row in reader:
                row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items() if isinstance(v, str)}
                try:
                    with session.begin_nested():
                        created = import_row(session, row)
                except ValueError as exc:
                    skipped.append(f"line {reader.line_num}: {row.get('email', '')!r}: {exc}")
                    continue
                if created:
                    imported += 1
                else:
                    skipped.append(f"line {reader.line_num}: {row['email']} is already a subscriber")
    except UnicodeDecodeError:
        raise Failure(f"{file.name}: not UTF-8 text; save the file as CSV UTF-8 and import it again") from None
    except csv.Error as exc:
        raise Failure(f"{file.name}: not a CSV file ({exc})") from None
    click.echo(f"imported {imported}, skipped {len(skipped)}")
    for reason in skipped:
        click.echo(f"  {reason}")


@subscribers.command("export")
@pass_state
def subscribers_export(state: State) -> None:
    """Write every subscriber with their consent record as CSV to standard output.

    The file imports into another installation with `newsletter subscribers import`.

    \b
    Example:
      $ newsletter subscribers export > subscribers.csv
    """
    nl = state.newsletter()
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    with nl.sessions() as session:
        for sub in session.scalars(select(Subscriber).order_by(Subscriber.id)).yield_per(1000):
            writer.writerow(export_row(sub))


# ---- the owner's views -----------------------------------------------------------------------------

@cli.command()
@pass_state
def embed(state: State) -> None:
    """Print an HTML form to paste into the blog (a sidebar widget) that subscribes readers here.

    It posts straight to this site's /subscribe, from any page of the blog, and needs no script.

    \b
    Example:
      $ newsletter embed > subscribe-widget.html
    """
    nl = state.newsletter()
    click.echo(render_template("web/embed.html", action=f"{nl.config.base_url}/subscribe"))


@cli.command()
@pass_state
def check(state: State) -> None:
    """Check the setup for what would otherwise show up as bounces or spam-foldered mail.

    Looks at base_url, the From domain, the SMTP server (reachable, TLS verified), DKIM, and prints
    the headers of a sample notification. Exits with status 1 when something needs fixing.

    \b
    Example:
      $ newsletter check
      ok    base_url: https://news.example.com
      ...
    """
    from .checks import run_checks

    checks = run_checks(state.app(check_schema=False))
    for item in checks:
        label = {True: "ok", False: "FIX", None: "info"}[item.ok]
        first, *rest = item.detail.splitlines() or [""]
        click.echo(f"{label:<5} {item.name}: {first}")
        for line in rest:
            click.echo(f"        {line}")
    if any(item.ok is False for item in checks):
        sys.exit(1)


@cli.command()
@pass_state
def stats(state: State) -> None:
    """Show subscribers by status, posts, queued mail, and whether sign-ups are being held.

    \b
    Example:
      $ newsletter stats
    """
    from .models import OutboxMessage, Signup
    from .subscriptions import signups_in_last_hour

    nl = state.newsletter()
    with nl.sessions() as session:
        counts = dict(session.execute(select(Subscriber.status, func.count()).group_by(Subscriber.status)).all())
        posts_total = session.scalar(select(func.count()).select_from(Post)) or 0
        waiting = session.scalar(select(func.count()).select_from(Post).where(Post.announced_at.is_(None))) or 0
        queued = session.scalar(select(func.count()).select_from(OutboxMessage).where(
            OutboxMessage.sent_at.is_(None), OutboxMessage.failed_at.is_(None), OutboxMessage.held.is_(False))) or 0
        held = session.scalar(select(func.count()).select_from(OutboxMessage).where(
            OutboxMessage.held.is_(True))) or 0
        recent = signups_in_last_hour(session)
        unrecorded = session.scalar(select(func.count()).select_from(Signup).where(Signup.processed_at.is_(None))) or 0
    click.echo("subscribers: " + ", ".join(f"{counts.get(s, 0)} {s.value}" for s in Status))
    click.echo(f"posts: {posts_total}, {waiting} not yet announced")
    click.echo(f"sign-ups waiting for the worker: {unrecorded}")
    click.echo(f"outbox: {queued} queued, {held} held")
    ceiling = nl.config.web.signup_ceiling
    if recent > ceiling or held:
        click.echo(f"sign-ups in the last hour: {recent} (ceiling {ceiling}): confirmation emails are HELD "
                   "until sign-ups slow down; check for a bot submitting addresses")
    else:
        click.echo(f"sign-ups in the last hour: {recent} (ceiling {ceiling})")


# ---- demo -----------------------------------------------------------------------------------------

@cli.command()
@click.option("--dir", "folder", default="newsletter-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the demo's database, config, feed and caught mail.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Web port.")
@click.option("--smtp-port", default=8025, show_default=True, type=click.IntRange(1, 65535),
              help="Port of the built-in mail catcher.")
def demo(folder: str, port: int, smtp_port: int) -> None:
    """Try everything on this machine: SQLite, a generated secret, a built-in mail catcher, a sample feed.

    \b
    Example:
      $ newsletter demo
      Open http://127.0.0.1:8000/ ...
    """
    from dataclasses import replace

    from .demo import MailCatcher, write_demo_config

    base = Path(folder)
    config_file = write_demo_config(base, port, smtp_port)
    try:
        app = create_app(replace(load_config(config_file), demo=True))
        nl = app.extensions["newsletter"]
        db.upgrade(nl.engine)
        with app.app_context():
            fetch_feed(nl)
    except (ConfigError, db.DatabaseError) as exc:
        raise Failure(str(exc), exit_code=2) from None
    app.config["DEMO_MAILDIR"] = str((base / "mail").resolve())
    app.config["DEMO_CONFIG"] = str(config_file.resolve())
    catcher = MailCatcher(base / "mail", smtp_port)
    try:
        catcher.start()
    except (OSError, RuntimeError) as exc:
        raise Failure(f"cannot start the mail catcher on 127.0.0.1:{smtp_port} ({exc}); "
                      "try --smtp-port with a free port") from None

    def banner() -> None:
        click.echo(f"""
  newsletter demo is running.
    Subscribe:        http://127.0.0.1:{port}/
    Caught emails:    http://127.0.0.1:{port}/demo  (also printed here as they arrive)
    Send new posts:   newsletter --config {config_file} send   (or the button on the demo page)
""")

    try:
        # one process: the demo page reads the mail catcher of this one
        run_site(app, "127.0.0.1", port, processes=1, threads=8, before=banner)
    finally:
        catcher.stop()


def main() -> None:
    try:
        cli(prog_name="newsletter")
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
