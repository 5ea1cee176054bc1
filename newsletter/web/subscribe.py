"""Sign-up: POST /subscribe, and the confirmation link (GET shows a button, POST confirms)."""

from __future__ import annotations

from flask import Blueprint, render_template, request

from ..app import newsletter, session
from ..models import Status, Subscriber
from ..subscriptions import InvalidAddress, confirm, subscribe
from ..tokens import ExpiredToken, InvalidToken
from . import requester

bp = Blueprint("subscribe", __name__)


@bp.post("/subscribe")
def submit() -> tuple[str, int]:
    address = request.form.get("email", "")
    db = session()
    try:
        subscribe(db, newsletter(), address, requester())
    except InvalidAddress as exc:
        db.rollback()
        return render_template("web/subscribe.html", error=str(exc), email=address[:320]), 400
    db.commit()
    return render_template("web/check_inbox.html"), 200


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
    if subscriber.status != Status.UNCONFIRMED or subscriber.confirm_nonce != claim.nonce:
        return None, "replaced"
    return subscriber, None


def _bad_link(reason: str) -> tuple[str, int]:
    return render_template("web/bad_link.html", reason=reason), 400


@bp.get("/confirm/<token>")
def confirm_page(token: str) -> tuple[str, int]:
    subscriber, problem = _confirmable(token)
    if problem:
        return _bad_link(problem)
    already = subscriber.status == Status.CONFIRMED  # type: ignore[union-attr]
    return render_template("web/confirm.html", token=token, already=already), 200


@bp.post("/confirm/<token>")
def confirm_submit(token: str) -> tuple[str, int]:
    subscriber, problem = _confirmable(token)
    if problem:
        return _bad_link(problem)
    already = subscriber.status == Status.CONFIRMED  # type: ignore[union-attr]
    if not already:
        confirm(session(), subscriber, newsletter(), requester())  # type: ignore[arg-type]
        session().commit()
    return render_template("web/confirmed.html", already=already), 200
