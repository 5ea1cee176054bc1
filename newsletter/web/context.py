"""What a request handler reaches through the current app: the installation, the database session of the
request, the sign-up log, who is asking."""

from __future__ import annotations

import ipaddress

from flask import abort, current_app, g, request
from flask_wtf.csrf import CSRFProtect
from sqlalchemy.orm import Session

from ..runtime import Newsletter
from ..signups import SignupLog
from ..subscriptions import NOT_AN_ADDRESS, InvalidAddress, Requester

csrf = CSRFProtect()


def newsletter() -> Newsletter:
    nl: Newsletter = current_app.extensions["newsletter"]
    return nl


def _(message: str, **values: object) -> str:
    """MESSAGE in the site's language ([site] language), with %(name)s placeholders filled from VALUES."""
    return newsletter().language.gettext(message, **values)


def invalid_address(exc: InvalidAddress) -> str:
    """Why an address was refused, in the site's language."""
    return newsletter().language.reason(str(exc), NOT_AN_ADDRESS)


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
    """Who is asking, for the consent record and the sign-up limits.

    Behind [web] trusted_proxies the address comes from X-Forwarded-For: a value there that is not an IP
    address is the proxy's mistake or a forgery, and is refused rather than stored.
    """
    ip = request.remote_addr
    if ip is not None:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            abort(400, _("The proxy in front of this site sent a client address that is not an IP address."))
    return Requester(ip=ip, user_agent=request.headers.get("User-Agent"))
