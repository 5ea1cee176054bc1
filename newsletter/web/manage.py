"""A reader's manage page: /manage/<token> from any email, and /manage to have such a link emailed.

GET and HEAD never change anything (mail scanners open every link); every change is a POST with its CSRF
token.
"""

from __future__ import annotations

import json
import math

from flask import Blueprint, Response, abort, make_response, render_template, request
from werkzeug.exceptions import TooManyRequests

from .. import manage
from ..models import Status, Subscriber
from ..subscriptions import InvalidAddress, normalize, unsubscribe
from ..tokens import ExpiredToken, InvalidToken
from .context import _, csrf, invalid_address, newsletter, requester, session, signup_log

bp = Blueprint("manage", __name__)


def _reader(token: str) -> Subscriber:
    """The subscriber the token names; else the request ends with the page saying why the link does not work."""
    try:
        subscriber_id = newsletter().tokens.read_manage_token(token)
    except ExpiredToken:
        abort(make_response(render_template("web/bad_link.html", reason="expired-manage"), 400))
    except InvalidToken:
        subscriber_id = None
    subscriber = session().get(Subscriber, subscriber_id) if subscriber_id is not None else None
    if subscriber is None:
        abort(make_response(render_template("web/bad_link.html", reason="manage"), 400))
    return subscriber


def _page(token: str, subscriber: Subscriber, changes: list[str] | None = None) -> str:
    choices = manage.choices(session(), newsletter(), subscriber)
    return render_template("web/manage.html", token=token, reader=subscriber, choices=choices, changes=changes)


@bp.get("/manage/<token>")
def page(token: str) -> tuple[str, int]:
    subscriber = _reader(token)
    return _page(token, subscriber), 200


@bp.post("/manage/<token>")
def save(token: str) -> tuple[str, int]:
    csrf.protect()
    subscriber = _reader(token)
    if subscriber.status != Status.CONFIRMED:
        return _page(token, subscriber), 200
    frequency = request.form.get("frequency")
    changes = manage.change(session(), newsletter(), subscriber, frequency, request.form.getlist("categories"))
    session().commit()
    return _page(token, subscriber, changes or [_("Nothing changed.")]), 200


@bp.post("/manage/<token>/unsubscribe")
def leave(token: str) -> tuple[str, int]:
    csrf.protect()
    subscriber = _reader(token)
    if unsubscribe(subscriber, requester()):
        session().commit()
    return render_template("web/unsubscribed.html"), 200


@bp.post("/manage/<token>/data")
def data(token: str) -> Response:
    csrf.protect()
    subscriber = _reader(token)
    body = json.dumps(manage.export(session(), subscriber), indent=2, ensure_ascii=False)
    return Response(
        body + "\n",
        mimetype="application/json",
        headers={"Content-Disposition": 'attachment; filename="my-subscription.json"'},
    )


@bp.post("/manage/<token>/erase")
def erase(token: str) -> tuple[str, int]:
    csrf.protect()
    subscriber = _reader(token)
    if request.form.get("sure") != "yes":
        return _page(token, subscriber, [_("Tick the box to confirm that everything about you should be erased.")]), 400
    manage.erase(session(), newsletter(), subscriber)
    session().commit()
    return render_template("web/erased.html"), 200


@bp.get("/manage")
def ask() -> str:
    return render_template("web/manage_ask.html")


@bp.post("/manage")
def send_link() -> tuple[str, int]:
    """The same page whether the address is known or not; only a known reader gets an email."""
    csrf.protect()
    address = request.form.get("email", "")
    try:
        normalize(address)
    except InvalidAddress as exc:
        return render_template("web/manage_ask.html", error=invalid_address(exc), email=address[:320]), 400
    wait = signup_log().note_request(requester())
    if wait is not None:
        raise TooManyRequests(retry_after=math.ceil(wait))
    manage.request_link(session(), newsletter(), address, requester())
    session().commit()
    return render_template("web/manage_sent.html"), 200
