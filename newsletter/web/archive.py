"""The public archive ([site] archive): /archive, /archive/<id> and the Atom feed /archive.xml."""

from __future__ import annotations

from flask import Blueprint, Response, abort, render_template, request

from .. import archive
from ..models import utcnow
from .context import newsletter

bp = Blueprint("archive", __name__)

# An email's HTML carries inline styles and the post's images: its page allows those and nothing else.
EMAIL_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src https: data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)


@bp.before_request
def enabled() -> None:
    if not newsletter().config.site.archive:
        abort(404)


@bp.get("/archive")
def index() -> str:
    number = request.args.get("page", "1")
    found = archive.page(newsletter(), int(number)) if number.isdigit() and len(number) < 8 else None
    if found is None:
        abort(404)
    return render_template("web/archive.html", page=found)


@bp.get("/archive/<int:post_id>")
def show(post_id: int) -> Response:
    emailed = archive.post(newsletter(), post_id)
    if emailed is None:
        abort(404)
    response = Response(archive.web_view(newsletter(), emailed), mimetype="text/html")
    response.headers["Content-Security-Policy"] = EMAIL_CSP
    return response


@bp.get("/archive.xml")
def feed() -> Response:
    latest = archive.page(newsletter(), 1)
    assert latest is not None  # page 1 always exists
    updated = latest.posts[0].announced_at if latest.posts else None
    atom = render_template(
        "web/archive.xml", posts=latest.posts, base_url=newsletter().config.base_url, updated=updated or utcnow()
    )
    return Response(atom, mimetype="application/atom+xml")
