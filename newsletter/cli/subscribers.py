"""`newsletter subscribers …`."""

from __future__ import annotations

import csv
import sys
from typing import TextIO

import click

from .. import roster
from ..models import Status
from ..subscriptions import InvalidAddress
from .base import Failure, State, pass_state


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
@pass_state
def subscribers_list(state: State, status: str | None) -> None:
    """Show subscribers and their status.

    \b
    Example:
      $ newsletter subscribers list --status confirmed
      reader@example.com  confirmed  2026-11-27
    """
    for sub in roster.listing(state.newsletter(), Status(status) if status else None):
        click.echo(f"{sub.email}  {sub.status.value}  {sub.created_at:%Y-%m-%d}")


@subscribers.command("add")
@click.argument("email")
@click.option("--confirmed", is_flag=True, help="Mark as confirmed (you have their consent) without an email.")
@click.option(
    "--force",
    is_flag=True,
    help="With --confirmed: confirm an address that unsubscribed or bounced (only when they asked you to).",
)
@pass_state
def subscribers_add(state: State, email: str, confirmed: bool, force: bool) -> None:
    """Add a subscriber by hand. An address that unsubscribed or bounced is never confirmed again without --force.

    \b
    Example:
      $ newsletter subscribers add reader@example.com --confirmed
      added reader@example.com (confirmed)
    """
    try:
        address, status, created = roster.add_subscriber(state.newsletter(), email, confirmed, force)
    except InvalidAddress as exc:
        raise Failure(f"{email!r}: {exc}") from None
    except roster.LeftTheList as exc:
        raise Failure(str(exc)) from None
    click.echo(f"{'added' if created else 'already there:'} {address} ({status.value})")


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
@click.argument("file", type=click.File("r", encoding="utf-8-sig"))
@pass_state
def subscribers_import(state: State, file: TextIO) -> None:
    """Import a CSV file: a column `email`, and optionally `status` and the consent columns of an export.

    Rows without status are imported as confirmed: import only people who agreed to get your posts.
    Existing subscribers are left as they are (nobody who left is re-subscribed).

    \b
    Example:
      $ newsletter subscribers import readers.csv
      imported 2, skipped 1
        line 4: 'not-an-address': An email address must have an @-sign.
    """
    try:
        report = roster.import_csv(state.newsletter(), file)
    except roster.ImportFileError as exc:
        raise Failure(str(exc)) from None
    click.echo(f"imported {report.imported}, skipped {len(report.skipped)}")
    for reason in report.skipped:
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
    csv.writer(sys.stdout, lineterminator="\n").writerows(roster.export(state.newsletter()))
