"""The Flask application factory and the per-app state every part shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flask import Flask, Request, current_app, g, request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from flask_wtf.csrf import CSRFProtect
from jinja2 import ChoiceLoader, FileSystemLoader
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.middleware.proxy_fix import ProxyFix

from . import db
from .config import Config
from .ratelimit import SignupLimit
from .resources import resource_dir
from .sanitize import html_to_text
from .tokens import Tokens

if TYPE_CHECKING:
    from .signups import SignupLog


csrf = CSRFProtect()


@dataclass
class Newsletter:
    """Configuration, database and token signer of one running app."""

    config: Config
    engine: Engine
    sessions: sessionmaker[Session]
    tokens: Tokens
    signups: SignupLog
    rendered: dict[str, str] = field(default_factory=dict)

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
        SECRET_KEY_FALLBACKS=config.security.secret_key_fallbacks,
        WTF_CSRF_CHECK_DEFAULT=False,
        WTF_CSRF_SSL_STRICT=False,
    )
    app.session_interface = _SessionInterface()
    if config.web.trusted_proxies:
        n = config.web.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n)  # type: ignore[method-assign]
    csrf.init_app(app)
    loaders = [FileSystemLoader(str(resource_dir("templates")))]
    if config.site.templates_dir:
        loaders.insert(0, FileSystemLoader(str(Path(config.site.templates_dir).expanduser())))
    app.jinja_loader = ChoiceLoader(loaders)  # type: ignore[assignment]
    app.jinja_env.filters["text"] = html_to_text
    app.jinja_env.globals["site"] = config.site

    from .signups import SignupLog

    engine = engine or db.make_engine(config.database.url)
    app.extensions["newsletter"] = Newsletter(
        config=config,
        engine=engine,
        sessions=db.make_sessionmaker(engine),
        tokens=Tokens(config.security.secret_key_fallbacks + [config.security.secret_key or "demo"],
                      config.security.confirm_max_age_hours * 3600),
        signups=SignupLog(engine, SignupLimit(config.web.rate_limit)),
    )

    from .web import demo, health, pages, subscribe, unsubscribe

    for module in (pages, subscribe, unsubscribe, health):
        app.register_blueprint(module.bp)
    if config.demo:
        app.register_blueprint(demo.bp)
    pages.install_error_pages(app)
    app.teardown_appcontext(_close_session)
    return app


class _SessionInterface(SecureCookieSessionInterface):
    """The session cookie only carries the CSRF secret, for the confirm and unsubscribe buttons."""

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if app.secret_key and "HTTP_COOKIE" not in request.environ:
            return self.session_class()  # most requests carry no cookie: skip building the signer
        return super().open_session(app, request)

    def get_cookie_secure(self, app: Flask) -> bool:
        """Secure whenever the request came over HTTPS."""
        return request.is_secure


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
