"""The Flask application factory."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from flask import Flask, Request, g, request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from werkzeug.exceptions import BadRequest
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import MapAdapter

from ..config import Config
from ..ratelimit import SignupLimit
from ..resources import resource_dir
from ..runtime import Newsletter, template_loader
from ..sanitize import html_to_text
from ..signups import SignupLog
from . import archive, demo, health, hooks, manage, pages, subscribe, unsubscribe
from .context import csrf


def create_app(config: Config | Newsletter) -> Flask:
    """The web app of an installation: its configuration, or the Newsletter already built from it."""
    nl = config if isinstance(config, Newsletter) else Newsletter(config)
    config = nl.config
    app = _App(__name__, template_folder=str(resource_dir("templates")), static_folder=None)
    app.config.update(
        SECRET_KEY=config.security.secret_key,
        MAX_CONTENT_LENGTH=64 * 1024,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SECURE=config.base_url.startswith("https://"),
        SESSION_COOKIE_SAMESITE="Lax",
        SECRET_KEY_FALLBACKS=config.security.secret_key_fallbacks,
        WTF_CSRF_CHECK_DEFAULT=False,
        WTF_CSRF_SSL_STRICT=False,
    )
    app.served_hosts = frozenset({public_host(config.base_url), *LOOPBACK})
    app.session_interface = _SessionInterface()
    if config.web.trusted_proxies:
        n = config.web.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n)  # type: ignore[method-assign]
    csrf.init_app(app)
    app.jinja_loader = template_loader(config)
    app.jinja_env.filters["text"] = html_to_text
    app.jinja_env.globals["site"] = config.site
    nl.language.install(app.jinja_env)
    app.extensions["newsletter"] = nl
    app.extensions["newsletter.signups"] = SignupLog(nl.engine, SignupLimit(config.web.rate_limit))
    app.extensions["newsletter.pages"] = {}
    for module in (pages, subscribe, unsubscribe, manage, archive, health, hooks):
        app.register_blueprint(module.bp)
    if config.demo:
        app.register_blueprint(demo.bp)
    pages.install_error_pages(app)
    app.teardown_appcontext(_close_session)
    return app


LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
ANY_HOST_PATHS = frozenset({"/healthz"})
HOST_HEADER = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::[0-9]{1,5})?")


def public_host(base_url: str) -> str:
    """The host of BASE_URL as a Host header names it: lower case, without the port, IPv6 in brackets."""
    host = urlsplit(base_url).hostname or ""
    return f"[{host}]" if ":" in host else host


class _App(Flask):
    """Answers only a Host naming base_url's host or a loopback name (any port), and gives any other its error
    page, with links built for base_url. The health check answers whatever the Host, since load balancers and
    container probes ask by IP address. (Flask's TRUSTED_HOSTS is not used: Werkzeug 3.1.9 matches no IPv6
    name in it.)
    """

    served_hosts: frozenset[str] = frozenset()

    def create_url_adapter(self, request: Request | None) -> MapAdapter | None:
        if request is not None and not self._addressed_to_us(request):
            return self._another_host(request)
        return super().create_url_adapter(request)

    def _addressed_to_us(self, request: Request) -> bool:
        named = HOST_HEADER.fullmatch(request.headers.get("Host", "").lower())
        return named is not None and named.group(1) in self.served_hosts

    def _another_host(self, request: Request) -> MapAdapter:
        nl: Newsletter = self.extensions["newsletter"]
        base_url = nl.config.base_url
        if request.path not in ANY_HOST_PATHS:
            request.routing_exception = BadRequest(
                nl.language.gettext(
                    "This site is at %(address)s; the request was addressed to another host.", address=f"{base_url}/"
                )
            )
        return self.url_map.bind_to_environ(request.environ, server_name=urlsplit(base_url).netloc, subdomain="")


class _SessionInterface(SecureCookieSessionInterface):
    """The session cookie only carries the CSRF secret, for the confirm and unsubscribe buttons."""

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if app.secret_key and "HTTP_COOKIE" not in request.environ:
            return self.session_class()  # most requests carry no cookie: skip building the signer
        return super().open_session(app, request)

    def get_cookie_secure(self, app: Flask) -> bool:
        """Secure whenever base_url is https, or the request came over HTTPS."""
        return bool(app.config["SESSION_COOKIE_SECURE"]) or request.is_secure


def _close_session(_exc: BaseException | None) -> None:
    db_session = g.pop("db_session", None)
    if db_session is not None:
        db_session.close()
