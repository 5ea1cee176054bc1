"""Sign-up: POST /subscribe, and the confirmation link (GET shows a button, POST confirms)."""

from __future__ import annotations

import math

from flask import Blueprint, Response, current_app, jsonify, render_template, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import Forbidden, HTTPException, TooManyRequests

from ..config import FREQUENCIES, origin_of
from ..i18n import N_
from ..models import Status, Subscriber
from ..subscriptions import InvalidAddress, confirm, confirmable, normalize, set_frequency
from ..tokens import ExpiredToken, InvalidToken
from .context import _, csrf, invalid_address, newsletter, rendered_pages, requester, session, signup_log
from .pages import error_text, subscribe_form

bp = Blueprint("subscribe", __name__)


class ForeignForm(Forbidden):
    """The form came from a page of another site than ours, the blog's or [web] embed_origins."""

    name = N_("Sign up on the newsletter's own page")
    description = N_(
        "This sign-up form was sent from a website the newsletter does not take sign-ups from, so nothing was "
        "sent. Please sign up on the newsletter's own page instead."
    )
    link_text = N_("Sign up on the newsletter's subscribe page")  # error.html's link to our own form


FORM_MAX_AGE = 24 * 3600
CHECK_INBOX = N_(
    "Check your inbox: if that address can receive our emails, a message with a confirmation link is on its way. "
    "Open it and confirm to start getting new posts."
)
PREFLIGHT_MAX_AGE = 3600


@bp.post("/subscribe")
def submit() -> ResponseReturnValue:
    """Every accepted form gets the same answer, whether the address is new, known, or a bot's.

    A browser asks for HTML and gets a page; the script of the blog's embedded form asks for JSON
    (`Accept: application/json`) and gets {"ok": ..., "message": ...} with the same status.
    """
    if not _wants_json():
        return _sign_up()
    try:
        return _sign_up()
    except HTTPException as exc:
        _title, message = error_text(exc)
        headers = [(name, value) for name, value in exc.get_headers() if name.lower() != "content-type"]
        return _json(False, message or "", exc.code or 500, headers)


def _sign_up() -> ResponseReturnValue:
    """The sign-up is only stored here; the worker records the subscriber and queues the confirmation email."""
    if not _origin_allowed():
        origin = request.headers.get("Origin", "")[:200]
        current_app.logger.warning(
            "sign-up refused: the form was posted from %r, which is not accepted; if that is the blog, "
            "set [site] blog_url to the blog's address or add %r to [web] embed_origins",
            origin,
            origin,
        )
        raise ForeignForm()
    if "email" not in request.form:
        return _refused(_("Please enter your email address."))
    address = request.form["email"]
    try:
        validated = normalize(address)
    except InvalidAddress as exc:
        return _refused(invalid_address(exc), email=address[:320])
    doubt = _doubt()
    if doubt is not None:
        message = _("%(doubt)s Nothing was sent yet: please press Subscribe again.", doubt=_(doubt))
        return _refused(message, email=address, about_address=False)
    wait = signup_log().add(validated.normalized, requester())
    if wait is not None:
        raise TooManyRequests(retry_after=math.ceil(wait))
    if _wants_json():
        return _json(True, _(CHECK_INBOX), 200)
    return _check_inbox()


def _refused(message: str, email: str = "", about_address: bool = True) -> ResponseReturnValue:
    """400: the form again with MESSAGE beside the address (or above the form when not ABOUT_ADDRESS)."""
    if _wants_json():
        return _json(False, message, 400)
    if about_address:
        return subscribe_form(error=message, email=email), 400
    return subscribe_form(notice=message, email=email), 400


def _wants_json() -> bool:
    return request.accept_mimetypes.best_match(("text/html", "application/json")) == "application/json"


def _json(ok: bool, message: str, status: int, headers: list[tuple[str, str]] | None = None) -> Response:
    response = jsonify(ok=ok, message=message)
    response.status_code = status
    response.headers.extend(headers or [])
    return response


@bp.after_request
def _cors(response: Response) -> Response:
    """Let the script of the form embedded in the blog read the answer, and nobody else's script.

    Only for the blog's site and [web] embed_origins, never with credentials; a preflight is answered for
    them too, though the snippet's post needs none. Our own pages post from the same origin and need no header.
    """
    if request.endpoint != "subscribe.submit":
        return response
    response.vary.add("Origin")
    origin = request.headers.get("Origin")
    if origin is None or origin.rstrip("/").lower() not in newsletter().config.form_origins:
        return response
    response.headers["Access-Control-Allow-Origin"] = origin
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = "POST"
        response.headers["Access-Control-Allow-Headers"] = "Accept, Content-Type"
        response.headers["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE)
    return response


def _check_inbox() -> tuple[str, int]:
    """The page every accepted form gets; it is the same for everyone, so each app renders it once."""
    rendered = rendered_pages()
    if request.script_root not in rendered:
        rendered[request.script_root] = render_template("web/check_inbox.html")
    return rendered[request.script_root], 200


def _origin_allowed() -> bool:
    """A browser says which page posted the form: our own, the blog's, or one listed in [web] embed_origins.

    Our pages send no Referer, so a browser may give their own forms `Origin: null`; Sec-Fetch-Site still
    tells that the post came from this site.
    """
    if request.headers.get("Sec-Fetch-Site") == "same-origin":
        return True
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin.rstrip("/").lower() in {origin_of(request.host_url), *newsletter().config.form_origins}


def _own_origins() -> set[str]:
    return {origin_of(request.host_url), origin_of(newsletter().config.base_url)}


def _doubt() -> str | None:
    """Why the form may not have been sent by a person, for them to read; None when nothing says so.

    Our own form carries a signed timestamp; the snippet embedded in the blog is plain HTML without one,
    so only a post from the blog's page may come without it. Browser autofill can send a form within a
    second and fill a hidden field, so a person who trips a check is asked to press again, never told a
    confirmation is on its way.
    """
    if request.form.get("website"):
        return N_("A field meant to stay empty came back filled in, as when a browser fills in a form by itself.")
    stamp = request.form.get("started")
    if stamp is None:
        if _from_another_site():
            return None
        return N_("The form came back without the part that shows it was opened here.")
    age = newsletter().tokens.form_age(stamp)
    if age is None:
        return N_("The form came back damaged.")
    if age > FORM_MAX_AGE:
        return N_("This form was opened more than a day ago.")
    if age < newsletter().config.web.min_fill_seconds:
        return N_("The form came back quicker than a person usually fills it in.")
    return None


def _from_another_site() -> bool:
    """The browser says the post came from another site (the blog's embedded form): _origin_allowed let it in."""
    if request.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
        return True
    origin = request.headers.get("Origin")
    return origin not in (None, "null") and origin.rstrip("/").lower() not in _own_origins()


def _confirmable(token: str) -> tuple[Subscriber | None, str | None]:
    """The subscriber the token confirms, or the reason it cannot."""
    try:
        claim = newsletter().tokens.read_confirm_token(token)
    except ExpiredToken:
        return None, "expired"
    except InvalidToken:
        return None, "invalid"
    subscriber = session().get(Subscriber, claim.subscriber_id)
    if subscriber is None:
        return None, "invalid"
    if subscriber.status == Status.CONFIRMED:
        return subscriber, None
    if not confirmable(subscriber, claim.nonce):
        return None, "replaced"
    return subscriber, None


def _bad_link(reason: str) -> tuple[str, int]:
    return render_template("web/bad_link.html", reason=reason), 400


@bp.get("/confirm/<token>")
def confirm_page(token: str) -> tuple[str, int]:
    subscriber, problem = _confirmable(token)
    if problem:
        return _bad_link(problem)
    assert subscriber is not None  # _confirmable gives one or the other
    already = subscriber.status == Status.CONFIRMED
    return render_template("web/confirm.html", token=token, already=already, frequency=subscriber.frequency), 200


@bp.post("/confirm/<token>")
def confirm_submit(token: str) -> tuple[str, int]:
    csrf.protect()
    subscriber, problem = _confirmable(token)
    if problem:
        return _bad_link(problem)
    assert subscriber is not None  # _confirmable gives one or the other
    already = subscriber.status == Status.CONFIRMED
    if not already:
        if request.form.get("frequency") in FREQUENCIES:
            set_frequency(subscriber, request.form["frequency"])
        confirm(session(), subscriber, newsletter(), requester())
        session().commit()
    return render_template("web/confirmed.html", already=already), 200
