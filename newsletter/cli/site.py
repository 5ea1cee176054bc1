"""Running and inspecting an installation: `db upgrade`, `serve`, `worker`, `demo`, `embed`, `check`, `stats`."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .. import db, transfer
from .. import stats as stats_service
from ..checks import run_checks
from ..config import ConfigError, load_config
from ..mailer import MailerError
from ..models import Status
from ..runtime import Newsletter
from ..serving import CAN_FORK, default_processes, listen
from ..serving import serve as serve_site
from ..worker import run_worker, work_once
from .base import Failure, State, pass_state
from .posts import fetch_feed

if TYPE_CHECKING:
    from flask import Flask


@click.group("db")
def db_group() -> None:
    """Create or update the database schema.

    \b
    Example:
      $ newsletter db upgrade
    """


@db_group.command("copy")
@click.argument("target_url", metavar="TARGET_URL")
@pass_state
def db_copy(state: State, target_url: str) -> None:
    """Copy everything to another, empty database: readers and their consent, posts, and the send ledger.

    Moves an installation from SQLite to PostgreSQL without sending anything twice: stop `serve` and the
    send timer, copy, then set [database] url to TARGET_URL and start them again. The source is not changed.

    \b
    Example:
      $ newsletter db copy postgresql+psycopg://newsletter@localhost/newsletter
      copied 1,204 rows: subscribers 412, posts 31, deliveries 761 (and 0 in 11 other tables)
    """
    nl = state.newsletter()
    try:
        target = db.make_engine(target_url)
        copied = transfer.copy_database(nl.engine, target)
    except transfer.TargetNotEmpty as exc:
        raise Failure(f"the target database already holds rows ({exc}); copy into an empty database") from None
    except (ConfigError, db.DatabaseError) as exc:
        raise Failure(str(exc), exit_code=2) from None
    except transfer.CopyFailed as exc:
        raise Failure(f"nothing was copied: {exc}", exit_code=2) from None
    filled = {name: n for name, n in copied.items() if n}
    listed = ", ".join(f"{name} {n:,}" for name, n in filled.items())
    empty = len(copied) - len(filled)
    click.echo(f"copied {sum(copied.values()):,} rows: {listed or 'none'} (and 0 in {empty} other tables)")


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


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option(
    "--processes",
    type=click.IntRange(1, 64),
    default=default_processes(),
    show_default="2 per CPU, at most 8",
    help="Web processes sharing the port (1 where the system cannot fork).",
)
@click.option(
    "--threads",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Request threads per process (more threads in one process mostly wait for each other).",
)
@click.option(
    "--no-worker", is_flag=True, help="Do not record sign-ups or deliver outbox mail here (run `newsletter worker`)."
)
@pass_state
def serve(state: State, host: str, port: int, processes: int, threads: int, no_worker: bool) -> None:
    """Run the subscribe pages with waitress, recording sign-ups and delivering their mail in the background.

    With more than one process, the web processes share the port and the worker runs in a process of its own.

    \b
    Example (behind a reverse proxy on the same host):
      $ newsletter serve --host 127.0.0.1 --port 8000
    """
    from ..web.app import create_app

    nl = state.newsletter()
    _run_site(nl, create_app(nl), host, port, processes if CAN_FORK else 1, threads, worker=not no_worker)


def _run_site(
    nl: Newsletter,
    app: Flask,
    host: str,
    port: int,
    processes: int,
    threads: int,
    worker: bool = True,
    before: Callable[[], None] | None = None,
) -> None:
    if not nl.config.base_url.startswith("https://") and not nl.config.demo:
        click.echo(
            f"warning: [site] base_url {nl.config.base_url} is not https; links in emails will not be encrypted",
            err=True,
        )
    try:
        sock = listen(host, port)
    except OSError as exc:
        raise Failure(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --host or --port"
        ) from None
    click.echo(
        f"Serving {nl.config.site.name} on http://{host}:{port}/ "
        f"({processes} web process{'es' if processes > 1 else ''}; Ctrl-C to stop)"
    )
    if before:
        before()
    from ..web.pages import security_headers

    try:
        serve_site(
            app,
            sock,
            processes,
            threads,
            background=(lambda stop: run_worker(nl, stop)) if worker else None,
            after_fork=lambda: nl.engine.dispose(close=False),
            error_headers=security_headers(nl.config),
        )
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM in the single-process server: requests already answered are kept
        pass


@click.command()
@click.option("--once", is_flag=True, help="Do what is due, then exit.")
@pass_state
def worker(state: State, once: bool) -> None:
    """Record sign-ups and deliver confirmation and welcome emails (when `serve --no-worker` runs the site).

    \b
    Example:
      $ newsletter worker --once
      sign-ups: 3 recorded; outbox: 3 sent, 0 deferred, 0 failed
    """
    nl = state.newsletter()
    if once:
        try:
            recorded, report = work_once(nl)
        except MailerError as exc:
            raise Failure(f"SMTP server {nl.config.smtp.host}:{nl.config.smtp.port}: {exc}") from None
        click.echo(
            f"sign-ups: {recorded} recorded; "
            f"outbox: {report.sent} sent, {report.deferred} deferred, {report.failed} failed"
        )
        return
    stop = threading.Event()
    click.echo("Recording sign-ups and delivering outbox mail (Ctrl-C to stop)")
    try:
        run_worker(nl, stop)
    except KeyboardInterrupt:
        stop.set()


@click.command()
@click.option(
    "--no-script",
    is_flag=True,
    help="Only the plain form, for a blog whose Content-Security-Policy forbids inline scripts.",
)
@pass_state
def embed(state: State, no_script: bool) -> None:
    """Print an HTML form to paste into the blog (a sidebar widget) that subscribes readers here.

    With JavaScript on, its small inline script sends the form from the blog's page and shows "Check your
    inbox", or what to fix, in place: the reader stays on the blog. Without JavaScript (or with --no-script)
    the form posts to this site's /subscribe and the reader lands on its "Check your inbox" page.

    Either way the form is only accepted from the blog's site: set [site] blog_url to the blog's address (by
    default the site of an http(s) feed_url), and list any other site that carries the form in
    [web] embed_origins, e.g. embed_origins = ["https://www.example.com"].

    \b
    Example:
      $ newsletter embed > subscribe-widget.html
    """
    nl = state.newsletter()
    config = nl.config
    if not config.site.blog and not config.web.embed_origins:
        click.echo(
            "warning: no blog site is set, so this form is refused on the blog: set [site] blog_url to the "
            "blog's address, or list the blog's origin in [web] embed_origins",
            err=True,
        )
    click.echo(
        nl.render(
            "web/embed.html", action=f"{config.base_url}/subscribe", page=f"{config.base_url}/", script=not no_script
        )
    )


@click.command()
@pass_state
def check(state: State) -> None:
    """Check the setup for what would otherwise show up as bounces or spam-foldered mail.

    Looks at base_url, the From domain, the SMTP server (reachable, TLS verified), DKIM, the sites the
    subscribe form is accepted from, the accent colour, and prints the headers of a sample notification.
    Exits with status 1 when something needs fixing (warnings do not change the status).

    \b
    Example:
      $ newsletter check
      ok    base_url: https://news.example.com
      ...
    """
    checks = run_checks(state.newsletter(check_schema=False))
    for item in checks:
        label = "warn" if item.warn else {True: "ok", False: "FIX", None: "info"}[item.ok]
        first, *rest = item.detail.splitlines() or [""]
        click.echo(f"{label:<5} {item.name}: {first}")
        for line in rest:
            click.echo(f"        {line}")
    if any(item.ok is False for item in checks):
        sys.exit(1)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document with every count.")
@pass_state
def stats(state: State, as_json: bool) -> None:
    """Show subscribers by status and frequency, weekly growth, how the last posts went, queued mail, and
    whether sign-ups are being held. Opens and clicks are not tracked.

    \b
    Example:
      $ newsletter stats
    """
    found = stats_service.collect(state.newsletter())
    if as_json:
        click.echo(json.dumps(_stats_document(found), indent=2))
        return
    click.echo("subscribers: " + ", ".join(f"{found.subscribers[s]} {s.value}" for s in Status))
    click.echo("confirmed by frequency: " + ", ".join(f"{n} {f}" for f, n in found.frequencies.items()))
    click.echo(f"posts: {found.posts}, {found.posts_waiting} not yet announced")
    click.echo(f"sign-ups waiting for the worker: {found.signups_unrecorded}")
    click.echo(
        f"sign-ups waiting for confirmation: {found.unconfirmed} (forgotten after {found.unconfirmed_days} days)"
    )
    kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(found.outbox_queued.items()))
    queued = sum(found.outbox_queued.values())
    click.echo(f"outbox: {queued} queued{f' ({kinds})' if kinds else ''}, {found.outbox_held} held")
    line = (
        f"sign-ups in the last hour: {found.signups_last_hour} "
        f"(ceiling {found.signup_ceiling}, {found.network_ceiling} per network)"
    )
    if found.holding:
        line += ": confirmation emails are HELD until sign-ups slow down; check for a bot submitting addresses"
    click.echo(line)
    click.echo("growth by week (confirmed, left):")
    for week in found.growth:
        click.echo(f"  {week.start:%Y-%m-%d}  +{week.confirmed}  -{week.left}")
    days = stats_service.LEFT_WITHIN.days
    click.echo(f"last {stats_service.POSTS_SHOWN} posts sent (unsubscribed: within {days} days):")
    for post in found.recent_posts:
        click.echo(
            f"  {post.sent_at:%Y-%m-%d}  {post.title}: {post.sent} sent, {post.failed} failed "
            f"({post.bounced} bounced), {post.unsubscribed} unsubscribed"
        )
    if not found.recent_posts:
        click.echo("  none yet")


def _stats_document(found: stats_service.Stats) -> dict[str, object]:
    """Stats as `stats --json` prints them."""
    return {
        "subscribers": {s.value: found.subscribers[s] for s in Status},
        "confirmed_by_frequency": found.frequencies,
        "posts": found.posts,
        "posts_not_announced": found.posts_waiting,
        "signups_waiting_for_worker": found.signups_unrecorded,
        "signups_waiting_for_confirmation": found.unconfirmed,
        "unconfirmed_forgotten_after_days": found.unconfirmed_days,
        "outbox_queued": dict(sorted(found.outbox_queued.items())),
        "outbox_held": found.outbox_held,
        "signups_last_hour": found.signups_last_hour,
        "signup_ceiling": found.signup_ceiling,
        "network_ceiling": found.network_ceiling,
        "holding": found.holding,
        "growth": [
            {"week": week.start.date().isoformat(), "confirmed": week.confirmed, "left": week.left}
            for week in found.growth
        ],
        "recent_posts": [
            {
                "id": post.id,
                "title": post.title,
                "sent_at": post.sent_at.isoformat(),
                "sent": post.sent,
                "failed": post.failed,
                "bounced": post.bounced,
                f"unsubscribed_within_{stats_service.LEFT_WITHIN.days}_days": post.unsubscribed,
            }
            for post in found.recent_posts
        ],
    }


@click.command()
@click.option(
    "--dir",
    "folder",
    default="newsletter-demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the demo's database, config, feed and caught mail.",
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Web port.")
@click.option(
    "--smtp-port",
    default=8025,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Port of the built-in mail catcher.",
)
def demo(folder: str, port: int, smtp_port: int) -> None:
    """Try everything on this machine: SQLite, a generated secret, a built-in mail catcher, a sample feed.

    \b
    Example:
      $ newsletter demo
      Open http://127.0.0.1:8000/ ...
    """
    from ..demo import MailCatcher, write_demo_config
    from ..web.app import create_app

    base = Path(folder)
    config_file = write_demo_config(base, port, smtp_port)
    try:
        nl = Newsletter(replace(load_config(config_file), demo=True))
        db.upgrade(nl.engine)
        fetch_feed(nl)
    except (ConfigError, db.DatabaseError) as exc:
        raise Failure(str(exc), exit_code=2) from None
    app = create_app(nl)
    app.config["DEMO_MAILDIR"] = str((base / "mail").resolve())
    app.config["DEMO_CONFIG"] = str(config_file.resolve())
    catcher = MailCatcher(base / "mail", smtp_port, announce=click.echo)
    try:
        catcher.start()
    except (OSError, RuntimeError) as exc:
        raise Failure(
            f"cannot start the mail catcher on 127.0.0.1:{smtp_port} ({exc}); try --smtp-port with a free port"
        ) from None

    def banner() -> None:
        click.echo(f"""
  newsletter demo is running.
    Subscribe:        http://127.0.0.1:{port}/
    Caught emails:    http://127.0.0.1:{port}/demo  (also printed here as they arrive)
    Send new posts:   newsletter --config {config_file} send   (or the button on the demo page)
""")

    try:
        # one process: the demo page reads the mail catcher of this one
        _run_site(nl, app, "127.0.0.1", port, processes=1, threads=8, before=banner)
    finally:
        catcher.stop()
