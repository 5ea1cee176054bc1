"""The subscribe page, the stylesheet, security headers and error pages."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from flask import Blueprint, Flask, Response, render_template, request
from werkzeug.exceptions import HTTPException

from ..config import Config
from ..i18n import N_
from .context import _, newsletter, rendered_pages

bp = Blueprint("pages", __name__)

CSP = (
    "default-src 'self'; script-src 'none'; style-src 'self'; img-src {images}; form-action 'self'; "
    "base-uri 'none'; object-src 'none'; frame-ancestors 'none'"
)
HSTS = "max-age=31536000"  # not includeSubDomains: the blog's other subdomains are not this app's to decide
SOURCE = re.compile(r"https?://(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(:[0-9]{1,5})?")


def content_security_policy(config: Config) -> str:
    """CSP, with the origin of [site] logo_url among the image sources when it is set."""
    logo = image_origin(config.site.logo_url)
    return CSP.format(images=f"'self' {logo}" if logo else "'self'")


def image_origin(url: str) -> str:
    """scheme://host[:port] of URL as a CSP source, or empty when URL is empty or its host cannot be one."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return ""
    host = parts.hostname or ""
    origin = f"{parts.scheme.lower()}://{f'[{host}]' if ':' in host else host}{f':{port}' if port else ''}"
    return origin if SOURCE.fullmatch(origin) else ""


def security_headers(config: Config) -> list[tuple[str, str]]:
    """The headers every response carries, error pages too; HSTS when base_url is https."""
    headers = [
        ("Content-Security-Policy", content_security_policy(config)),
        ("X-Content-Type-Options", "nosniff"),
        ("X-Frame-Options", "DENY"),
        ("Referrer-Policy", "no-referrer"),
    ]
    if config.base_url.startswith("https://"):
        headers.append(("Strict-Transport-Security", HSTS))
    return headers


@bp.get("/")
def index() -> str:
    return subscribe_form()


def subscribe_form(error: str | None = None, email: str = "", notice: str | None = None) -> str:
    """The form, with a fresh signed timestamp; ERROR is about the address, NOTICE about the sign-up."""
    stamp = newsletter().tokens.form_stamp()
    return render_template("web/subscribe.html", error=error, email=email, notice=notice, started=stamp)


@bp.get("/style.css")
def stylesheet() -> Response:
    """templates/web/style.css (or the owner's) in the accent colour; the same for every request, so rendered
    once per app."""
    rendered = rendered_pages()
    if "style.css" not in rendered:
        rendered["style.css"] = render_template(
            "web/style.css", accent_hover=darker(newsletter().config.site.accent_color)
        )
    return Response(rendered["style.css"], mimetype="text/css", headers={"Cache-Control": "public, max-age=3600"})


def darker(color: str, by: float = 0.15) -> str:
    """#rrggbb COLOR with each channel BY nearer black."""
    return "#" + "".join(f"{round(int(color[i : i + 2], 16) * (1 - by)):02x}" for i in (1, 3, 5))


ERRORS = {  # what a reader reads for each status, where the handler gave no words of its own
    400: (N_("Bad request"), N_("The request could not be understood. Please go back and try again.")),
    403: (N_("Not allowed"), N_("This page cannot be used this way. Please go back and try again.")),
    404: (N_("Page not found"), N_("There is nothing at this address. Check the link, or start again below.")),
    405: (N_("Not allowed"), N_("This page cannot be used this way. Please go back and try again.")),
    413: (N_("Too much data"), N_("That form sent far more data than a sign-up needs.")),
    429: (
        N_("Too many sign-ups"),
        N_("Too many sign-ups came from your network in a short time. Please try again later."),
    ),
    500: (N_("Something went wrong"), N_("Please try again in a moment.")),
}


def error_text(exc: HTTPException) -> tuple[str, str]:
    """The title and message of EXC's error page in the site's language. Words the catalog lacks (Werkzeug's,
    Flask-WTF's) give way to the status's own; English keeps them."""
    code = exc.code or 500
    title, message = ERRORS.get(code, ERRORS[400 if code < 500 else 500])
    language = newsletter().language
    if code in (413, 429) or not exc.description:
        return language.gettext(title), language.gettext(message)
    return language.reason(exc.name, title), language.reason(exc.description, message)


def install_error_pages(app: Flask) -> None:
    fixed = security_headers(app.extensions["newsletter"].config)
    language = app.extensions["newsletter"].language.code

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[str, int, list[tuple[str, str]]]:
        title, message = error_text(exc)
        headers = [(name, value) for name, value in exc.get_headers() if name.lower() != "content-type"]
        link_text = getattr(exc, "link_text", None)
        page = render_template(
            "web/error.html", code=exc.code, title=title, message=message, link_text=link_text and _(link_text)
        )
        return page, exc.code or 500, headers

    @app.errorhandler(Exception)
    def server_error(exc: Exception) -> tuple[str, int]:
        app.logger.exception("unhandled error on %s %s", request.method, request.path)
        title, message = ERRORS[500]
        return render_template("web/error.html", code=500, title=_(title), message=_(message)), 500

    @app.after_request
    def add_security_headers(response: Response) -> Response:
        for name, value in fixed:
            response.headers.setdefault(name, value)
        response.headers.setdefault("Content-Language", language)
        if request.path != "/style.css":
            response.headers["Cache-Control"] = "no-store"
        return response
