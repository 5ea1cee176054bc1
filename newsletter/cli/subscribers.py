"""`newsletter subscribers …`."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, BinaryIO

import click

from .. import imports, roster
from ..mailer import MailerError
from ..models import Status, Subscriber
from ..outbox import deliver_outbox
from ..runtime import Newsletter
from ..subscriptions import CONFIRM_RESEND_INTERVAL, CONFIRMATIONS_PER_DAY, InvalidAddress
from .base import Failure, State, pass_state, stop_exit_code

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar


@click.group()
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
@click.option("--search", metavar="TEXT", help="Only addresses containing TEXT (any case).")
@click.option(
    "--since", type=click.DateTime(["%Y-%m-%d"]), metavar="YYYY-MM-DD", help="Only those who signed up on or after."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document: the subscribers and the total.")
@pass_state
def subscribers_list(
    state: State, status: str | None, search: str | None, since: datetime | None, as_json: bool
) -> None:
    """Show subscribers, their status and the day they signed up, then how many there are.

    \b
    Example:
      $ newsletter subscribers list --status confirmed --search example.com
      reader@example.com  confirmed  2026-11-27
      1 subscriber
    """
    if search is not None and not search.isprintable():
        raise Failure(f"--search {search!r}: not printable text; give part of an address")
    found = roster.listing(
        state.newsletter(), Status(status) if status else None, search, since.replace(tzinfo=UTC) if since else None
    )
    if as_json:
        rows = [_as_json(sub) for sub in found]
        click.echo(json.dumps({"subscribers": rows, "total": len(rows)}, indent=2))
        return
    total = 0
    for sub in found:
        click.echo(f"{sub.email}  {sub.status.value}  {roster.joined_at(sub):%Y-%m-%d}")
        total += 1
    click.echo(f"{total:,} subscriber{'' if total == 1 else 's'}")


def _as_json(sub: Subscriber) -> dict[str, str | None]:
    times = {
        name: when.isoformat() if when else None
        for name, when in [
            ("subscribed_at", roster.joined_at(sub)),
            ("confirmed_at", sub.confirmed_at),
            ("unsubscribed_at", sub.unsubscribed_at),
        ]
    }
    return {"email": sub.email, "status": sub.status.value, "frequency": sub.frequency, **times}


@subscribers.command("add")
@click.argument("email")
@click.option("--confirmed", is_flag=True, help="Mark as confirmed (you have their consent) without an email.")
@click.option("--invite", is_flag=True, help="Send a confirmation email, as the sign-up form does.")
@click.option(
    "--force",
    is_flag=True,
    help="With --confirmed: confirm an address that unsubscribed or bounced (only when they asked you to).",
)
@pass_state
def subscribers_add(state: State, email: str, confirmed: bool, invite: bool, force: bool) -> None:
    """Add a subscriber by hand. An address that unsubscribed or bounced is never confirmed again without --force.

    Without --confirmed or --invite, the address is added unconfirmed and no email is sent.

    \b
    Examples:
      $ newsletter subscribers add reader@example.com --confirmed
      added reader@example.com (confirmed)
      $ newsletter subscribers add friend@example.com --invite
      added friend@example.com (unconfirmed): sent a confirmation email
    """
    if confirmed and invite:
        raise Failure("--confirmed and --invite exclude each other: --invite asks the reader to confirm")
    try:
        if invite:
            _invite(state.newsletter(), email)
            return
        address, status, created = roster.add_subscriber(state.newsletter(), email, confirmed, force)
    except InvalidAddress as exc:
        raise Failure(f"{email!r}: {exc}") from None
    except roster.LeftTheList as exc:
        raise Failure(str(exc)) from None
    line = f"{'added' if created else 'already there:'} {address} ({status.value})"
    if status is Status.UNCONFIRMED and not confirmed:
        line += ": no email was sent; run with --invite to send a confirmation email"
    click.echo(line)


def _invite(nl: Newsletter, email: str) -> None:
    """Queue a confirmation email to EMAIL and send it now if the SMTP server takes it; say what happened."""
    done = roster.invite(nl, email)
    line = f"{'added' if done.created else 'already there:'} {done.address} ({done.status.value})"
    if done.email_id is None:
        minutes = CONFIRM_RESEND_INTERVAL // timedelta(minutes=1)
        why = {
            Status.CONFIRMED: "they are confirmed already",
            Status.BOUNCED: "their address bounced",
        }.get(done.status, f"one went out in the last {minutes} minutes, or {CONFIRMATIONS_PER_DAY} today")
        click.echo(f"{line}: no email was sent ({why})")
        return
    if done.held:
        click.echo(f"{line}: a confirmation email is held until sign-ups slow down (see `newsletter stats`)")
        return
    try:
        deliver_outbox(nl)
    except MailerError as exc:
        click.echo(f"{line}: a confirmation email is queued; the worker sends it (SMTP server: {exc})")
        return
    outcome, reply = roster.outbox_state(nl, done.email_id)
    if outcome == "sent":
        click.echo(f"{line}: sent a confirmation email")
    elif outcome == "failed":
        raise Failure(f"{done.address}: the confirmation email was refused: {reply}")
    else:
        click.echo(f"{line}: a confirmation email is queued; the worker tries again ({reply})")


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
    try:
        removed = roster.remove_subscriber(state.newsletter(), email)
    except InvalidAddress as exc:
        raise Failure(f"{email!r}: {exc}") from None
    if removed is None:
        raise Failure(f"no subscriber {email!r}")
    click.echo(f"removed {removed} and their data")


@subscribers.command("import")
@click.argument("file", type=click.File("rb"))
@click.option("--verbose", "-v", is_flag=True, help="List every row not imported: its line and why.")
@click.option("--dry-run", is_flag=True, help="Count what would be imported; write nothing.")
@pass_state
def subscribers_import(state: State, file: BinaryIO, verbose: bool, dry_run: bool) -> None:
    """Import a CSV file: this newsletter's export, or one of WordPress.com/Jetpack, FeedBurner, Mailchimp or Substack.

    The file is recognised by its columns: `email` and optionally `status` and the consent columns of an
    export; Mailchimp's audience export (its subscribed, unsubscribed and cleaned files); Substack's
    (`email`, `active_subscription`, `email_disabled`, `created_at`); FeedBurner's (`Email`, `Subscribed`,
    `Status`); WordPress.com's (`email_address` or `Email`, `date_subscribed` or `Subscribed`). Commas,
    semicolons or tabs separate the columns. The consent times and IP addresses go into the consent record.

    Rows without status are imported as confirmed: import only people who agreed to get your posts. Those
    who unsubscribed are imported as unsubscribed and those whose address bounced (Mailchimp's cleaned) as
    bounced: never mailed. Rows never confirmed at the other service (FeedBurner's Pending Verification) are
    skipped: no email is sent. Existing subscribers are left as they are (nobody who left is re-subscribed),
    so running it again changes nothing. Rows are committed a thousand at a time, so the sign-up form keeps
    working; an interrupted import keeps what it committed, and running it again finishes it.

    \b
    Example:
      $ newsletter subscribers import readers.csv
      imported 2; already there 1; refused 1 (run with --verbose to list them)
    """
    nl = state.newsletter()
    text = io.TextIOWrapper(file, encoding="utf-8-sig", newline="")  # a line break inside a quoted cell stays
    bar = _ImportBar(os.path.basename(file.name)) if sys.stderr.isatty() else None
    try:
        report = imports.import_csv(nl, text, listed=verbose, progress=bar, dry_run=dry_run, recognised=_say_what_it_is)
    except imports.ImportFileError as exc:
        raise Failure(str(exc)) from None
    finally:
        if bar is not None:
            bar.finish()
    click.echo(_import_summary(report, verbose))
    for line, why in report.listed or []:
        click.echo(f"  line {line}: {why}")
    if report.stopped_by is not None:
        sys.exit(stop_exit_code(report.stopped_by))


def _say_what_it_is(layout: imports.ImportLayout) -> None:
    what = layout.describe()
    if what is not None:
        click.echo(f"recognised {what}")


def _import_summary(report: imports.ImportReport, verbose: bool) -> str:
    imported = f"would import {report.imported:,}" if report.dry_run else f"imported {report.imported:,}"
    line = f"{imported}; already there {report.already:,}; refused {report.refused:,}"
    if report.never_confirmed:
        line += f"; skipped {report.never_confirmed:,} never confirmed"
    if report.dry_run:
        line = "dry run: " + line
    if report.stopped_by is None and report.already and not (report.imported or report.refused):
        other = "other " if report.never_confirmed else ""
        line += f"; nothing to import: every {other}address is already on the list"
    elif (report.already or report.refused or report.never_confirmed) and not verbose:
        line += " (run with --verbose to list them)"
    if report.dry_run:
        line += "; nothing was written"
    if report.stopped_by is not None:
        line += (
            "; interrupted"
            if report.dry_run
            else "; interrupted: the rows imported so far are kept, run the same import again to finish"
        )
    return line


class _ImportBar:
    """The rows read so far on stderr, as `newsletter send` shows its progress; once the file's rows are known."""

    def __init__(self, label: str) -> None:
        self.label = label[:40]
        self.bar: ProgressBar[int] | None = None
        self.started = 0.0

    def __call__(self, report: imports.ImportReport) -> None:
        if report.rows is None:
            return
        if self.bar is None:
            self.started = time.monotonic()
            self.bar = click.progressbar(
                length=report.rows,
                label=self.label,
                file=sys.stderr,
                show_pos=True,
                show_eta=True,
                item_show_func=self._rate,
            )
        self.bar.update(report.read - self.bar.pos)

    def _rate(self, _item: object) -> str:
        elapsed = time.monotonic() - self.started
        return f"{self.bar.pos / elapsed:,.0f}/s" if self.bar is not None and elapsed > 0 else ""

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.render_finish()


@subscribers.command("export")
@pass_state
def subscribers_export(state: State) -> None:
    """Write every subscriber with their consent record as CSV to standard output.

    The file imports into another installation with `newsletter subscribers import`.

    \b
    Example:
      $ newsletter subscribers export > subscribers.csv
    """
    csv.writer(sys.stdout, lineterminator="\r\n").writerows(roster.export(state.newsletter()))  # RFC 4180
