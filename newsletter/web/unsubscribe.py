"""Leaving: GET shows a button; POST unsubscribes, including RFC 8058 one-click POSTs from mail clients."""

from __future__ import annotations

from flask import Blueprint, Response, render_template, request

from ..models import Subscriber
from ..subscriptions import unsubscribe
from ..tokens import InvalidToken
from .context import _, csrf, newsletter, requester, session

bp = Blueprint("unsubscribe", __name__)


def _subscriber_id(token: str) -> int | None:
    try:
        return newsletter().tokens.read_unsubscribe_token(token)
    except InvalidToken:
        return None


@bp.get("/unsubscribe/<token>")
def page(token: str) -> tuple[str, int]:
    if _subscriber_id(token) is None:
        return render_template("web/bad_link.html", reason="unsubscribe"), 400
    return render_template("web/unsubscribe.html", token=token), 200


@bp.post("/unsubscribe/<token>")
def submit(token: str) -> tuple[str | Response, int]:
    one_click = request.form.get("List-Unsubscribe") == "One-Click"
    if not one_click:
        csrf.protect()
    subscriber_id = _subscriber_id(token)
    if subscriber_id is None:
        return render_template("web/bad_link.html", reason="unsubscribe"), 400
    subscriber = session().get(Subscriber, subscriber_id)
    if subscriber is not None and unsubscribe(subscriber, requester()):
        session().commit()
    if one_click:
        return Response(_("Unsubscribed.") + "\n", mimetype="text/plain"), 200
    return render_template("web/unsubscribed.html"), 200
