"""Pages served only by `newsletter demo`: the caught emails, and buttons to publish a post and send it."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

from flask import Blueprint, Response, abort, current_app, redirect, render_template, url_for
from werkzeug.wrappers import Response as BaseResponse

from .. import db, dispatch
from ..demo import caught
from ..feeds import FeedError
from ..posts import fetch_feed
from .context import newsletter

bp = Blueprint("demo", __name__, url_prefix="/demo")

NEW_ITEM = """<item>
		<title>Demo post published at {time}</title>
		<link>https://harbour-notes.example/demo/{stamp}/</link>
		<guid isPermaLink="false">demo-{stamp}</guid>
		<pubDate>{date}</pubDate>
		<description><![CDATA[<p>A post added from the demo page at {time}.
		Every confirmed subscriber gets an email about it.</p>]]></description>
	</item>
	"""


def _folder() -> Path:
    return Path(current_app.config["DEMO_MAILDIR"])


def _part(message: EmailMessage, kind: str) -> str:
    part = message.get_body((kind,))
    return part.get_content() if part is not None else ""


@bp.get("/")
def mailbox() -> str:
    messages = [(name, m, _part(m, "plain")) for name, m in caught(_folder())]
    return render_template("web/demo.html", messages=messages, config_path=current_app.config["DEMO_CONFIG"])


@bp.get("/mail/<name>.html")
def mail_html(name: str) -> Response:
    for found, message in caught(_folder()):
        if found == name:
            return Response(
                _part(message, "html"),
                mimetype="text/html",
                headers={
                    "Content-Security-Policy": "sandbox allow-popups allow-popups-to-escape-sandbox "
                    "allow-top-navigation-by-user-activation"
                },
            )
    abort(404)


@bp.post("/publish")
def publish() -> BaseResponse:
    """Add an item to the demo blog's feed, as if the blog had just published a post."""
    feed = Path(newsletter().config.site.feed_url)
    now = datetime.now(UTC)
    item = NEW_ITEM.format(
        time=now.strftime("%H:%M:%S"), stamp=now.strftime("%Y%m%d%H%M%S%f"), date=format_datetime(now)
    )
    feed.write_text(feed.read_text(encoding="utf-8").replace("<item>", item + "<item>", 1), encoding="utf-8")
    return redirect(url_for("demo.mailbox"), code=303)


@bp.post("/send")
def run_send() -> BaseResponse:
    """What `newsletter send` does, in the background."""
    nl = newsletter()
    log = current_app.logger

    def work() -> None:
        try:
            with db.sender_lock(nl.engine) as sender_id:
                fetch_feed(nl)
                log.info("demo send: %s", dispatch.send(nl, sender_id).summary())
        except (FeedError, db.SenderBusy) as exc:
            log.warning("demo send: %s", exc)

    threading.Thread(target=work, daemon=True).start()
    return redirect(url_for("demo.mailbox"), code=303)
