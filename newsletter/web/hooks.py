"""POST /hooks/publish: the blog says a post went out; the worker fetches the feed and sends within seconds."""

from __future__ import annotations

import logging

from flask import Blueprint, abort, jsonify, request
from flask.typing import ResponseReturnValue

from ..publish import SIGNATURE_HEADER, BadSignature, record_ping
from .context import csrf, newsletter

bp = Blueprint("hooks", __name__)
csrf.exempt(bp)
log = logging.getLogger(__name__)


@bp.post("/hooks/publish")
def publish() -> ResponseReturnValue:
    """Record a ping signed with [schedule] webhook_secret for the worker; 404 while no secret is set."""
    nl = newsletter()
    if not nl.config.schedule.webhook_secret:
        abort(404)
    try:
        record_ping(nl, request.headers.get(SIGNATURE_HEADER, ""), request.get_data())
    except BadSignature as exc:
        log.warning("publish hook refused from %s: %s", request.remote_addr, exc)
        return jsonify(status="refused", error=str(exc)), 403
    return jsonify(status="accepted"), 202
