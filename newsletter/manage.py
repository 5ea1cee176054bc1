"""A reader's own page: how they get email (frequency, categories), their data, leaving, being erased, and the
email that brings them there when they ask for it at /manage."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from . import categories, db, roster
from .config import FREQUENCIES
from .i18n import N_
from .models import CONFIRMATIONS, Delivery, DeliveryStatus, Digest, Erased, Post, Status, Subscriber, utcnow
from .runtime import Newsletter
from .subscriptions import Requester, email_key, normalize, queue_email, set_frequency, throttle_key

LINKS_PER_DAY = 3
LINK_KIND = "manage"  # in the confirmations table, counted apart from confirmation emails


@dataclass(frozen=True)
class Choices:
    """What a reader may choose and has chosen."""

    frequency: str
    categories: list[tuple[str, bool]]  # each category on offer, and whether the reader chose it


def choices(session: Session, nl: Newsletter, subscriber: Subscriber) -> Choices:
    chosen = categories.chosen(session, subscriber.id)
    offered = categories.available(nl, session)
    return Choices(subscriber.frequency, [(name, categories.key(name) in chosen) for name in offered])


def change(
    session: Session, nl: Newsletter, subscriber: Subscriber, frequency: str | None, names: list[str]
) -> list[str]:
    """Apply the reader's choices; returns a line for each thing that changed.

    Posts already announced are never sent again, whatever changes; posts waiting for a digest follow the
    new frequency (subscriptions.set_frequency).
    """
    changes = []
    if frequency is not None and frequency in FREQUENCIES and set_frequency(subscriber, frequency):
        changes.append(nl.language.gettext(FREQUENCY_CHANGED[frequency]))
    before = categories.chosen(session, subscriber.id)
    after = categories.choose(session, nl, subscriber.id, names)
    if after != before:
        offered = {categories.key(name): name for name in categories.available(nl, session)}
        if after:
            chosen = nl.language.list(offered[key] for key in sorted(after))
            changes.append(nl.language.gettext("You now get posts about %(categories)s.", categories=chosen))
        else:
            changes.append(nl.language.gettext("You now get every post, whatever its category."))
    return changes


FREQUENCY_CHANGED = {
    "instant": N_("You now get an email for each new post."),
    "daily": N_("You now get a daily digest."),
    "weekly": N_("You now get a weekly digest."),
}


_OWNER = Requester.admin().user_agent or ""
_IMPORTED_FROM = f"{_OWNER}: import from "  # and the service's name: imports.ImportLayout.user_agent
_ON_THE_WEB = {
    "subscribed": "sign-up form",
    "confirmed": "confirmation link in the email sent to this address",
    "unsubscribed": (
        "on the web: the unsubscribe link in an email, the Unsubscribe button of the reader's mail program, "
        "or the reader's subscription page"
    ),
}
_BY_HAND = {
    "subscribed": "added by the site owner from the command line",
    "confirmed": "marked confirmed by the site owner",
}
_RECORDED_AS = {  # the user agents that roster.add and inbound.py write, each for one step
    f"{_OWNER} --force": "marked confirmed by the site owner after the reader had left (--force)",
    Requester.unsubscribe_email().user_agent: "email sent to the unsubscribe address of a newsletter email",
    Requester.spam_complaint().user_agent: "spam complaint: the reader's email provider reported an email as spam",
}


def _how(step: str, ip: str | None, user_agent: str | None) -> str:
    """How a step of the consent record happened, in plain English, told by its IP and user agent."""
    agent = user_agent or ""
    if agent.startswith(_IMPORTED_FROM):
        source = agent.removeprefix(_IMPORTED_FROM)
        return f"imported by the site owner from {source}" + ("" if step == "subscribed" else f" as {step}")
    if agent == _OWNER and (ip is not None or step not in _BY_HAND):
        return "imported by the site owner" + ("" if step == "subscribed" else f" as {step}")
    if agent == _OWNER:
        return _BY_HAND[step]
    return _RECORDED_AS.get(agent, _ON_THE_WEB[step])


def export(session: Session, subscriber: Subscriber) -> dict[str, Any]:
    """Everything kept about the reader, as JSON-ready data: download my data."""

    def when(value: object) -> str | None:
        return value.isoformat() if hasattr(value, "isoformat") else None

    instant = (
        select(Post, Delivery.updated_at)
        .join(Delivery, Delivery.post_id == Post.id)
        .where(Delivery.subscriber_id == subscriber.id, Delivery.status == DeliveryStatus.SENT)
    )
    in_digest = (
        select(Post, Digest.updated_at)
        .join(Delivery, Delivery.post_id == Post.id)
        .join(Digest, Digest.id == Delivery.digest_id)
        .where(Delivery.subscriber_id == subscriber.id, Digest.status == DeliveryStatus.SENT)
    )
    mailed = [
        {"title": post.title, "url": post.url, "emailed_at": when(at)}
        for query in (instant, in_digest)
        for post, at in session.execute(query)
    ]
    mailed.sort(key=lambda item: item["emailed_at"] or "")
    consent: dict[str, dict[str, str | None]] = {}
    for step in ("subscribed", "confirmed", "unsubscribed"):
        at = getattr(subscriber, f"{step}_at")
        if at is not None:
            ip, user_agent = getattr(subscriber, f"{step}_ip"), getattr(subscriber, f"{step}_user_agent")
            consent[step] = {"at": when(at), "ip": ip, "user_agent": user_agent, "how": _how(step, ip, user_agent)}
    return {
        "email": subscriber.email,
        "status": subscriber.status.value,
        "consent": consent,
        "frequency": subscriber.frequency,
        "categories": sorted(categories.chosen(session, subscriber.id)) or "all",
        "emails_received": mailed,
    }


def erase(session: Session, nl: Newsletter, subscriber: Subscriber) -> None:
    """Delete the reader and everything about them for good, keeping only roster.erased_key of the address."""
    key = roster.erased_key(nl, subscriber.email_key)
    if session.get(Erased, key) is None:
        session.add(Erased(key_hash=key))
    roster.remove(session, subscriber)


def request_link(session: Session, nl: Newsletter, raw: str, requester: Requester) -> None:
    """Email a manage link (valid a day) to a known reader, confirmed or not, at most LINKS_PER_DAY a day
    however the address is spelled. Says nothing either way: the page must not tell who is subscribed.

    Raises subscriptions.InvalidAddress for something that is not an address.
    """
    validated = normalize(raw)
    subscriber = session.scalar(select(Subscriber).where(Subscriber.email_key == email_key(validated)))
    if subscriber is None or subscriber.status not in (Status.CONFIRMED, Status.UNCONFIRMED):
        return
    conn = session.connection()
    throttle = f"{LINK_KIND}:{throttle_key(validated)}"
    db.advisory_xact_lock(conn, throttle)
    since = utcnow() - timedelta(days=1)
    recent = select(func.count()).where(CONFIRMATIONS.c.throttle_key == throttle, CONFIRMATIONS.c.sent_at > since)
    if (conn.scalar(recent) or 0) >= LINKS_PER_DAY:
        return
    conn.execute(insert(CONFIRMATIONS).values(throttle_key=throttle, subscriber_id=subscriber.id, sent_at=utcnow()))
    queue_email(
        conn,
        nl,
        subscriber.id,
        subscriber.email_ascii,
        "manage",
        nl.language.gettext("Manage your subscription to %(name)s", name=nl.config.site.name),
        manage_url=f"{nl.config.base_url}/manage/{nl.tokens.manage_link_token(subscriber.id)}",
    )
