"""The Flask application factory."""

from __future__ import annotations

from flask import Flask, Request, g, request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from werkzeug.middleware.proxy_fix import ProxyFix

from ..config import Config
from ..ratelimit import SignupLimit
from ..resources import resource_dir
from ..runtime import Newsletter, template_loader
from ..sanitize import html_to_text
from ..signups import SignupLog
from . import demo, health, pages, subscribe, unsubscribe
from .context import csrf


def create_app(config: Config | Newsletter) -> Flask:
    """The web app of an installation: its configuration, or the Newsletter already built from it."""
    nl = config if isinstance(config, Newsletter) else Newsletter(config)
    config = nl.config
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
    app.jinja_loader = template_loader(config)
    app.jinja_env.filters["text"] = html_to_text
    app.jinja_env.globals["site"] = config.site
    app.extensions["newsletter"] = nl
    app.extensions["newsletter.signups"] = SignupLog(nl.engine, SignupLimit(config.web.rate_limit))
    app.extensions["newsletter.pages"] = {}
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


def _close_session(_exc: BaseException | None) -> None:
    db_session = g.pop("db_session", None)
    if db_session is not None:
        db_session.close()
