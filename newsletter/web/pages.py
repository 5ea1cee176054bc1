"""The subscribe page, the stylesheet, security headers and error pages."""

from __future__ import annotations

from flask import Blueprint, Flask, Response, render_template, request
from werkzeug.exceptions import HTTPException

from ..config import Config
from ..resources import resource_dir
from .context import newsletter

bp = Blueprint("pages", __name__)

CSP = (
    "default-src 'self'; script-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "base-uri 'none'; object-src 'none'; frame-ancestors 'none'"
)
HSTS = "max-age=31536000"  # not includeSubDomains: the blog's other subdomains are not this app's to decide


def security_headers(config: Config) -> list[tuple[str, str]]:
    """The headers every response carries, error pages too; HSTS when base_url is https."""
    headers = [
        ("Content-Security-Policy", CSP),
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
    css = (resource_dir("templates") / "web" / "style.css").read_text(encoding="utf-8")
    return Response(css, mimetype="text/css", headers={"Cache-Control": "public, max-age=3600"})


FRIENDLY = {
    429: ("Too many sign-ups", "Too many sign-ups came from your network in a short time. Please try again later."),
    413: ("Too much data", "That form sent far more data than a sign-up needs."),
}


def install_error_pages(app: Flask) -> None:
    fixed = security_headers(app.extensions["newsletter"].config)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[str, int, list[tuple[str, str]]]:
        title, message = FRIENDLY.get(exc.code or 500, (exc.name, exc.description))
        headers = [(name, value) for name, value in exc.get_headers() if name.lower() != "content-type"]
        return render_template("web/error.html", code=exc.code, title=title, message=message), exc.code or 500, headers

    @app.errorhandler(Exception)
    def server_error(exc: Exception) -> tuple[str, int]:
        app.logger.exception("unhandled error on %s %s", request.method, request.path)
        return render_template(
            "web/error.html", code=500, title="Something went wrong", message="Please try again in a moment."
        ), 500

    @app.after_request
    def add_security_headers(response: Response) -> Response:
        for name, value in fixed:
            response.headers.setdefault(name, value)
        if request.path != "/style.css":
            response.headers["Cache-Control"] = "no-store"
        return response
