"""`newsletter inbound`: the mail that comes back, from an MTA's pipe or a Maildir."""

from __future__ import annotations

import collections
import mailbox
import os
import sys
from pathlib import Path

import click

from ..runtime import Newsletter
from .base import Failure, State, pass_state

EX_TEMPFAIL = 75  # sysexits.h: the MTA keeps the message and tries again later


@click.command()
@click.option(
    "--maildir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Process every new message of this Maildir and move each to its cur/ folder.",
)
@click.option(
    "--recipient",
    default="",
    metavar="ADDRESS",
    help="The envelope recipient, when the MTA passes it (Postfix pipe: ${original_recipient}); by default "
    "$ORIGINAL_RECIPIENT or $RECIPIENT (set by Postfix's local delivery), else the message's headers.",
)
@pass_state
def inbound(state: State, maildir: Path | None, recipient: str) -> None:
    """Read mail sent back to [bounces] address and to the unsubscribe address, and act on it.

    A bounce (RFC 3464 or a plain-text one) about one of our emails marks its reader bounced when it is
    permanent, or adds to their score when temporary; a spam complaint (ARF) unsubscribes the reader; any
    email to unsubscribe+TOKEN@ unsubscribes the reader of that email. Automatic replies and anything else
    are ignored, with one line on stdout. Exits 0 when the message was handled or ignored, 75 (EX_TEMPFAIL)
    when the database or configuration cannot be used, so the MTA keeps the message and retries.

    \b
    Examples:
      # /etc/aliases, with recipient_delimiter = + in Postfix's main.cf
      bounces:     "|newsletter --config /srv/newsletter/config.toml inbound"
      unsubscribe: "|newsletter --config /srv/newsletter/config.toml inbound"
      # or, from cron, a mailbox a hosted relay forwards bounces to
      $ newsletter inbound --maildir ~/Maildir
      processed 3: bounced 1, ignored 1, soft bounce 1
    """
    from .. import inbound as inbound_service  # flufl.bounce takes a while to load: only for this command

    try:
        nl = state.newsletter()
    except Failure as exc:
        raise Failure(f"{exc.message} (the message is left to the mail server to retry)", EX_TEMPFAIL) from None
    try:
        if maildir is None:
            envelope_recipient = recipient or os.environ.get("ORIGINAL_RECIPIENT") or os.environ.get("RECIPIENT", "")
            click.echo(inbound_service.handle(nl, sys.stdin.buffer.read(), envelope_recipient))
            return
        _process_maildir(nl, maildir)
    except inbound_service.Unavailable as exc:
        raise Failure(f"the database cannot be used ({exc}); try again later", EX_TEMPFAIL) from None


def _process_maildir(nl: Newsletter, path: Path) -> None:
    from .. import inbound as inbound_service

    box = mailbox.Maildir(path, factory=None, create=False)
    counts: collections.Counter[str] = collections.Counter()
    try:
        for key in sorted(box.keys()):
            message = box.get_message(key)
            if message.get_subdir() != "new":
                continue
            with box.get_file(key) as file:
                outcome = inbound_service.handle(nl, file.read())
            click.echo(outcome)
            message.set_subdir("cur")
            message.add_flag("S")
            box[key] = message
            counts[outcome.action] += 1
    finally:
        total = sum(counts.values())
        summary = ", ".join(f"{action} {n}" for action, n in sorted(counts.items()))
        click.echo(f"processed {total}" + (f": {summary}" if summary else ""))
