"""The Flask application factory and the per-app state every part shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flask import Flask, current_app, g
from jinja2 import ChoiceLoader, FileSystemLoader
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from . import db
from .config import Config
from .resources import resource_dir
from .sanitize import html_to_text
from .tokens import Tokens


@dataclass
class Newsletter:
    """Configuration, database and token signer of one running app."""

    config: Config
    engine: Engine
    sessions: sessionmaker[Session]
    tokens: Tokens

    def confirm_url(self, subscriber_id: int, nonce: str) -> str:
        return f"{self.config.base_url}/confirm/{self.tokens.confirm_token(subscriber_id, nonce)}"

    def unsubscribe_url(self, subscriber_id: int) -> str:
        return f"{self.config.base_url}/unsubscribe/{self.tokens.unsubscribe_token(subscriber_id)}"


def create_app(config: Config, engine: Engine | None = None) -> Flask:
    app = Flask(__name__, template_folder=str(resource_dir("templates")), static_folder=None)
    app.config.update(
        SECRET_KEY=config.security.secret_key,
        MAX_CONTENT_LENGTH=64 * 1024,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=config.base_url.startswith("https://"),
    )
    loaders = [FileSystemLoader(str(resource_dir("templates")))]
    if config.site.templates_dir:
        loaders.insert(0, FileSystemLoader(str(Path(config.site.templates_dir).expanduser())))
    app.jinja_loader = ChoiceLoader(loaders)  # type: ignore[assignment]
    app.jinja_env.filters["text"] = html_to_text
    app.jinja_env.globals["site"] = config.site

    engine = engine or db.make_engine(config.database.url)
    app.extensions["newsletter"] = Newsletter(
        config=config,
        engine=engine,
        sessions=db.make_sessionmaker(engine),
        tokens=Tokens(config.security.secret_key_fallbacks + [config.security.secret_key or "demo"],
                      config.security.confirm_max_age_hours * 3600),
    )

    from .web import demo, health, pages, subscribe, unsubscribe

    for module in (pages, subscribe, unsubscribe, health):
        app.register_blueprint(module.bp)
    if config.demo:
        app.register_blueprint(demo.bp)
    pages.install_error_pages(app)
    app.teardown_appcontext(_close_session)
    return app


def newsletter() -> Newsletter:
    return current_app.extensions["newsletter"]


def session() -> Session:
    """The database session of the current app context."""
    if "db_session" not in g:
        g.db_session = newsletter().sessions()
    return g.db_session


def _close_session(_exc: BaseException | None) -> None:
    db_session = g.pop("db_session", None)
    if db_session is not None:
        db_session.close()
