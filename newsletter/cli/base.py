"""The root `newsletter` group, and how a command gets the installation it works on."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType

import click

from .. import db
from ..config import ConfigError, load_config
from ..runtime import Newsletter


class Failure(click.ClickException):
    """Ends the command with one line on stderr and a non-zero status."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        setattr(self, "exit_code", exit_code)  # noqa: B010 (a class variable in click's types; click reads it here)


class State:
    """Builds the installation on first use, so --help and bad configuration never need a database."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._newsletter: Newsletter | None = None

    def newsletter(self, check_schema: bool = True) -> Newsletter:
        """The installation; exits 2 with one line when its configuration, key or database cannot be used."""
        if self._newsletter is None:
            try:
                nl = Newsletter(load_config(self.config_path))
                if check_schema:
                    db.require_current_schema(nl.engine)
                    _ = nl.signer
            except (ConfigError, db.DatabaseError) as exc:
                raise Failure(str(exc), exit_code=2) from None
            click.get_current_context().call_on_close(nl.engine.dispose)
            self._newsletter = nl
        return self._newsletter


pass_state = click.make_pass_decorator(State)


class Terminated(KeyboardInterrupt):
    """SIGTERM (systemd, docker stop, timeout): every command stops on it as it does on Ctrl-C."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def stop_exit_code(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal that stopped the command: 143 for SIGTERM, 130 for Ctrl-C (SIGINT)."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    type=click.Path(dir_okay=False),
    help="Configuration file. Default: $NEWSLETTER_CONFIG, else ./config.toml.",
)
@click.version_option(package_name="newsletter")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """Email subscriptions for a blog: sign-up with double opt-in, new-post notifications, one-click unsubscribe.

    \b
    Examples:
      Try it with no setup:   newsletter demo
      Real install:           newsletter config example > config.toml   (then edit it)
                              newsletter db upgrade
                              newsletter serve
      Announce new posts:     newsletter send
    """
    ctx.obj = State(config_path)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mail.log"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # a warning for every request queued under load


def main() -> None:
    try:
        cli(prog_name="newsletter")
    except KeyboardInterrupt as interrupt:
        click.echo("interrupted", err=True)
        sys.exit(stop_exit_code(interrupt))
