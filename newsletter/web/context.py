"""What a request handler reaches through the current app: the installation, the database session of the
request, the sign-up log, who is asking."""

from __future__ import annotations

from flask import current_app, g, request
from flask_wtf.csrf import CSRFProtect
from sqlalchemy.orm import Session

from ..runtime import Newsletter
from ..signups import SignupLog
from ..subscriptions import Requester

csrf = CSRFProtect()


def newsletter() -> Newsletter:
    nl: Newsletter = current_app.extensions["newsletter"]
    return nl


def signup_log() -> SignupLog:
    log: SignupLog = current_app.extensions["newsletter.signups"]
    return log


def rendered_pages() -> dict[str, str]:
    """Pages that are the same for every request, rendered once per app."""
    pages: dict[str, str] = current_app.extensions["newsletter.pages"]
    return pages


def session() -> Session:
    """The database session of the current app context."""
    if "db_session" not in g:
        g.db_session = newsletter().sessions()
    db_session: Session = g.db_session
    return db_session


def requester() -> Requester:
    """Who is asking, for the consent record."""
    return Requester(ip=request.remote_addr, user_agent=request.headers.get("User-Agent"))
