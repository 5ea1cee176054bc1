"""Setting up an installation: `init` writes a first configuration, `config example` prints the annotated one."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .. import install
from ..config import ConfigError
from ..mailer import SECURITY_MODES
from ..resources import resource_file
from .base import Failure, State
from .site import check, db_upgrade


@click.group("config")
def config_group() -> None:
    """Configuration files.

    \b
    Example:
      $ newsletter config example > config.toml
    """


@config_group.command("example")
def config_example() -> None:
    """Print config.example.toml: every key, its default and what it does.

    \b
    Example:
      $ newsletter config example > config.toml
    """
    click.echo(resource_file("config.example.toml").read_text(encoding="utf-8"), nl=False)


_INIT_QUESTIONS = (  # option, (section, key), prompt, default (None: must be answered)
    ("name", ("site", "name"), "Blog name", "My Blog"),
    ("base_url", ("site", "base_url"), "Public address of these pages (base URL)", "http://localhost:8000"),
    ("feed_url", ("site", "feed_url"), "Your blog's RSS or Atom feed URL", None),
    ("language", ("site", "language"), "Language of the pages and emails (en, de, es, fr, ja)", "en"),
    ("from_", ("smtp", "from"), 'Sender, like "My Blog <news@example.com>"', None),
    ("smtp_host", ("smtp", "host"), "SMTP relay host", "localhost"),
    ("smtp_port", ("smtp", "port"), "SMTP port", 587),
    ("smtp_security", ("smtp", "security"), "SMTP security (none, starttls, tls)", "starttls"),
    ("smtp_username", ("smtp", "username"), "SMTP username (empty: none)", ""),
    ("smtp_password", ("smtp", "password"), "SMTP password", ""),
    ("database_url", ("database", "url"), "Database URL", "sqlite:///newsletter.db"),
)


@click.command()
@click.option("--name", help="The blog's name, shown on the pages and in emails.")
@click.option("--base-url", help="Where these pages are served, e.g. https://news.example.com.")
@click.option("--feed-url", help="The blog's RSS or Atom feed.")
@click.option("--language", help="Of the pages and emails readers see: en (default), de, es, fr, ja.")
@click.option("--from", "from_", help='The sender of every email, e.g. "My Blog <news@example.com>".')
@click.option("--smtp-host", help="The relay that delivers the mail.")
@click.option("--smtp-port", type=click.IntRange(1, 65535), help="Its port (587 with starttls, 465 with tls).")
@click.option("--smtp-security", type=click.Choice(SECURITY_MODES), help="How the connection is secured.")
@click.option("--smtp-username", help="Login at the relay, if it asks for one.")
@click.option("--smtp-password", help="Its password (asked without echo when not given).")
@click.option("--database-url", help="SQLite file or PostgreSQL URL; default sqlite:///newsletter.db.")
@click.option("--no-input", is_flag=True, help="Ask nothing: take the defaults; --feed-url and --from are required.")
@click.pass_context
def init(ctx: click.Context, no_input: bool, **given: str | int | None) -> None:
    """Write a first config.toml (a new secret key, readable by you alone), create the database, then check.

    Asks for what is not given as an option. The file is written to --config PATH, else $NEWSLETTER_CONFIG,
    else config.toml here,
    and never replaces an existing one. Exits 0 once the file and the database are ready, even when the
    check marks something to fix (such as an SMTP relay not reachable yet).

    \b
    Example:
      $ newsletter init --no-input --name "Harbour Notes" --base-url https://news.example.com \\
          --feed-url https://harbour-notes.example/feed/ --from "Harbour Notes <news@example.com>" \\
          --smtp-host smtp.example.com
    """
    state: State = ctx.obj
    path = Path(state.config_path or os.environ.get("NEWSLETTER_CONFIG") or "config.toml")
    if path.exists():
        raise Failure(f"{path} exists; init never replaces a configuration (edit it, or pass --config NEW.toml)")
    answers: dict[tuple[str, str], str | int] = {}
    for option, key, question, default in _INIT_QUESTIONS:
        value = given[option]
        if value is None and no_input and default is None:
            raise Failure(f"--{option.rstrip('_').replace('_', '-')} is required with --no-input")
        if value is None:
            value = default if no_input else _ask(question, default, hide=option == "smtp_password")
        assert value is not None  # given, asked, or a default
        answers[key] = value
    try:
        install.write_config(path, answers)
    except FileExistsError:
        raise Failure(f"{path} exists; init never replaces a configuration") from None
    except ConfigError as exc:
        raise Failure(f"{exc} (nothing was written)", exit_code=2) from None
    click.echo(f"wrote {path} (mode 600, with a new secret key)")
    state.config_path = str(path)
    ctx.invoke(db_upgrade)
    try:
        ctx.invoke(check)
    except SystemExit as exc:
        if exc.code:
            click.echo(f"fix what is marked FIX in {path}, then run `newsletter check` again")


def _ask(question: str, default: str | int | None, hide: bool) -> str | int:
    kind = click.INT if isinstance(default, int) else click.STRING
    answer = click.prompt(question, default=default, type=kind, hide_input=hide, show_default=not hide)
    return answer if isinstance(answer, int) else str(answer)
