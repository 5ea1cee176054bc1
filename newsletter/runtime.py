"""What every part of a running installation shares: its configuration, database, link signing, email
templates and the way out for mail. Built once per process; nothing here knows Flask, so the worker, the
sender and every command send mail without a web app."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from jinja2 import ChoiceLoader, Environment, FileSystemLoader
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from . import db
from .config import Config
from .i18n import Language
from .mailer import SMTPConnection, Transport
from .resources import resource_dir
from .sanitize import html_to_text
from .signing import Signer, SigningTransport, load_signer
from .tokens import Tokens

AUTOESCAPED = (".html", ".htm", ".xml", ".xhtml", ".svg")


def template_loader(config: Config) -> ChoiceLoader:
    """The owner's [site] templates_dir first, then the built-in templates."""
    loaders = [FileSystemLoader(str(resource_dir("templates")))]
    if config.site.templates_dir:
        loaders.insert(0, FileSystemLoader(str(Path(config.site.templates_dir).expanduser())))
    return ChoiceLoader(loaders)


def template_environment(config: Config, language: Language) -> Environment:
    """Templates rendered outside a web request (emails, the embed snippet), autoescaped as Flask does."""
    environment = Environment(
        loader=template_loader(config), autoescape=lambda name: name is None or name.endswith(AUTOESCAPED)
    )
    environment.filters["text"] = html_to_text
    environment.globals["site"] = config.site
    language.install(environment)
    return environment


class Newsletter:
    """Configuration, database, token signer, email templates and mail transport of one installation."""

    def __init__(self, config: Config, engine: Engine | None = None) -> None:
        self.config = config
        self.engine = engine or db.make_engine(config.database.url)
        self.sessions: sessionmaker[Session] = db.make_sessionmaker(self.engine)
        security = config.security
        self.tokens = Tokens(
            security.secret_key_fallbacks + [security.secret_key or "demo"], security.confirm_max_age_hours * 3600
        )
        self.language = Language(config.site.language, config.site.templates_dir)
        self.templates = template_environment(config, self.language)
        self.transport_factory: Callable[[], Transport] = self.smtp_connection

    @functools.cached_property
    def signer(self) -> Signer | None:
        """The DKIM signer, loaded once; None when [dkim] is off. Raises ConfigError when it cannot sign."""
        return load_signer(self.config)

    def render(self, name: str, **context: object) -> str:
        """The template NAME (a path under templates/, such as email/welcome.txt) filled in with CONTEXT."""
        return self.templates.get_template(name).render(**context)

    def confirm_url(self, subscriber_id: int, nonce: str) -> str:
        return f"{self.config.base_url}/confirm/{self.tokens.confirm_token(subscriber_id, nonce)}"

    def unsubscribe_url(self, subscriber_id: int) -> str:
        return f"{self.config.base_url}/unsubscribe/{self.tokens.unsubscribe_token(subscriber_id)}"

    def return_path(self, kind: str, row_id: int) -> str:
        """The envelope sender of one email: with [bounces] address, an address that names it (VERP), so a
        bounce says which email failed; else the From address."""
        bounces = self.config.bounces
        if not bounces.address:
            return self.from_addr_spec
        return f"{bounces.local_part}+{self.tokens.return_token(kind, row_id)}@{bounces.domain}"

    @functools.cached_property
    def from_addr_spec(self) -> str:
        """[smtp] from's address alone (worked out once: a send asks for it for every message)."""
        return self.config.from_address.addr_spec

    def mailto_unsubscribe(self, kind: str, row_id: int) -> str | None:
        """The mailto: unsubscribe address of one list email, when [bounces] address says where mail is read."""
        bounces = self.config.bounces
        if not bounces.address:
            return None
        return f"mailto:unsubscribe+{self.tokens.return_token(kind, row_id)}@{bounces.domain}"

    def manage_url(self, subscriber_id: int) -> str:
        return f"{self.config.base_url}/manage/{self.tokens.manage_token(subscriber_id)}"

    def smtp_connection(self) -> SMTPConnection:
        smtp = self.config.smtp
        return SMTPConnection(
            smtp.host,
            smtp.port,
            security=smtp.security,
            username=smtp.username,
            password=smtp.password,
            timeout=float(smtp.timeout),
        )

    def transport(self) -> Transport:
        """A new connection to the mail server (transport_factory), signing with DKIM when [dkim] is set."""
        transport = self.transport_factory()
        return SigningTransport(transport, self.signer) if self.signer is not None else transport
