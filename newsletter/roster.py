"""The owner's side of the subscriber list: add and remove by hand, list and export with the consent record."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from email_validator import ValidatedEmail
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .models import DIGESTS, Delivery, Erased, OutboxMessage, Status, Subscriber, utcnow
from .runtime import Newsletter
from .subscriptions import Requester, email_key, normalize, subscribe


def find(session: Session, raw: str) -> Subscriber | None:
    return session.scalar(select(Subscriber).where(Subscriber.email_key == email_key(normalize(raw))))


def erased_key(nl: Newsletter, address_key: str) -> str:
    """A keyed hash of an address (its email_key): it tells an erased address again, and cannot be read back."""
    secret = nl.config.security.secret_key.encode()
    return hmac.new(secret, address_key.encode(), hashlib.sha256).hexdigest()


def was_erased(session: Session, nl: Newsletter, address_key: str) -> bool:
    return session.get(Erased, erased_key(nl, address_key)) is not None


def _get_or_create(
    session: Session, validated: ValidatedEmail, status: Status, frequency: str
) -> tuple[Subscriber, bool]:
    """The subscriber row for an address, created if new; safe when two requests race."""
    key = email_key(validated)
    existing = session.scalar(select(Subscriber).where(Subscriber.email_key == key))
    if existing is not None:
        return existing, False
    subscriber = Subscriber(
        email=validated.normalized,
        email_key=key,
        email_ascii=validated.ascii_email or validated.normalized,
        status=status,
        frequency=frequency,
    )
    try:
        with session.begin_nested():
            session.add(subscriber)
    except IntegrityError:
        return session.scalars(select(Subscriber).where(Subscriber.email_key == key)).one(), False
    return subscriber, True


class LeftTheList(ValueError):
    """The address unsubscribed or bounced: the owner may add it back only deliberately (--force)."""


def add(
    session: Session,
    raw: str,
    confirmed: bool,
    requester: Requester,
    force: bool = False,
    nl: Newsletter | None = None,
) -> tuple[Subscriber, bool]:
    """An address added by the owner; returns (subscriber, created).

    CONFIRMED confirms a new or unconfirmed address; one that unsubscribed or bounced stays so (LeftTheList)
    unless FORCE, and then the consent record says the owner confirmed it, when, and that it was forced.
    With NL, a new reader gets [digest] default_frequency, and an address its reader had erased is refused
    (LeftTheList) unless FORCE.
    """
    validated = normalize(raw)
    if nl is not None and not force and was_erased(session, nl, email_key(validated)):
        raise LeftTheList(
            f"{validated.normalized} was erased at the reader's request, so it is not added again; add --force "
            "only if they asked you to add them back"
        )
    frequency = nl.config.digest.default_frequency if nl is not None else "instant"
    subscriber, created = _get_or_create(session, validated, Status.UNCONFIRMED, frequency)
    now = utcnow()
    if created:
        subscriber.subscribed_at, subscriber.subscribed_user_agent = now, requester.user_agent
    if confirmed and subscriber.status != Status.CONFIRMED:
        left = subscriber.status in (Status.UNSUBSCRIBED, Status.BOUNCED)
        if left and not force:
            raise LeftTheList(
                f"{subscriber.email} is {subscriber.status.value}: they left the list, so it is not confirmed "
                "again; add --force only if they asked you to add them back"
            )
        subscriber.status = Status.CONFIRMED
        subscriber.confirmed_at, subscriber.confirmed_ip = now, None
        subscriber.confirmed_user_agent = f"{requester.user_agent} --force" if left else requester.user_agent
    return subscriber, created


EXPORT_COLUMNS = [
    "email",
    "status",
    "created_at",
    "subscribed_at",
    "subscribed_ip",
    "confirmed_at",
    "confirmed_ip",
    "unsubscribed_at",
    "unsubscribed_ip",
]


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
QUOTED_STARTS = (*FORMULA_STARTS, "'")  # a cell that starts with the quote itself gets one too, to come back whole


def spreadsheet_safe(cell: str) -> str:
    """CELL as a spreadsheet shows it and never runs it: a leading ' before what starts a formula (OWASP)."""
    return "'" + cell if cell.startswith(QUOTED_STARTS) else cell


def from_spreadsheet(cell: str) -> str:
    """A cell as spreadsheet_safe wrote it, back as it was."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(QUOTED_STARTS) else cell


def export_row(subscriber: Subscriber) -> list[str]:
    values = []
    for column in EXPORT_COLUMNS:
        value = getattr(subscriber, column)
        text = value.value if isinstance(value, Status) else value.isoformat() if isinstance(value, datetime) else value
        values.append(spreadsheet_safe(text or ""))
    return values


def remove(session: Session, subscriber: Subscriber) -> None:
    """Delete the subscriber with their deliveries and digests; queued emails, throttle records and chosen
    categories go by ON DELETE CASCADE."""
    session.execute(delete(Delivery).where(Delivery.subscriber_id == subscriber.id))
    session.execute(delete(DIGESTS).where(DIGESTS.c.subscriber_id == subscriber.id))
    session.delete(subscriber)


def add_subscriber(nl: Newsletter, raw: str, confirmed: bool, force: bool = False) -> tuple[str, Status, bool]:
    """Add an address from the command line; returns (address, status, created).

    Raises InvalidAddress, or LeftTheList for an address that left when CONFIRMED is asked without FORCE.
    """
    with nl.sessions.begin() as session:
        subscriber, created = add(session, raw, confirmed, Requester.admin(), force, nl)
        return subscriber.email, subscriber.status, created


@dataclass(frozen=True)
class Invitation:
    """What `subscribers add --invite` did: the address, its status, and the confirmation email queued (its
    outbox id, or None when the address is confirmed or bounced, or had its confirmation emails for today)."""

    address: str
    status: Status
    created: bool
    email_id: int | None
    held: bool = False


def invite(nl: Newsletter, raw: str) -> Invitation:
    """Sign RAW up as the form does, from the command line: a confirmation email within the per-address limits,
    and a reader who left stays so until they click. Raises InvalidAddress, or LeftTheList when the address
    was erased at the reader's request."""
    validated = normalize(raw)
    with nl.sessions.begin() as session:
        if was_erased(session, nl, email_key(validated)):
            raise LeftTheList(f"{validated.normalized} was erased at the reader's request, so it is not invited")
        created = find(session, raw) is None
        last = session.scalar(select(func.max(OutboxMessage.id))) or 0
        subscribe(session, nl, raw, Requester.admin())
        subscriber = find(session, raw)
        assert subscriber is not None
        queued = session.execute(
            select(OutboxMessage.id, OutboxMessage.held).where(
                OutboxMessage.id > last, OutboxMessage.subscriber_id == subscriber.id
            )
        ).first()
        return Invitation(
            subscriber.email,
            subscriber.status,
            created,
            queued.id if queued else None,
            bool(queued and queued.held),
        )


def outbox_state(nl: Newsletter, email_id: int) -> tuple[str, str | None]:
    """Whether outbox email EMAIL_ID was sent, failed or is still waiting, with the server's reply if any."""
    with nl.sessions() as session:
        email = session.get(OutboxMessage, email_id)
        if email is None or email.sent_at is not None:
            return "sent", None
        return ("failed" if email.failed_at is not None else "waiting"), email.error


def remove_subscriber(nl: Newsletter, raw: str) -> str | None:
    """Delete the subscriber with address RAW and all their data; returns the address, or None if unknown."""
    with nl.sessions.begin() as session:
        subscriber = find(session, raw)
        if subscriber is None:
            return None
        remove(session, subscriber)
        return subscriber.email


def joined_at(subscriber: Subscriber) -> datetime:
    """When the subscriber signed up (for an imported row, as the file said), else when the row was made."""
    return subscriber.subscribed_at or subscriber.created_at


def listing(
    nl: Newsletter, status: Status | None = None, search: str | None = None, since: datetime | None = None
) -> Iterator[Subscriber]:
    """Every subscriber, oldest first, read a thousand at a time; only those with STATUS, whose address
    contains SEARCH (any case), who signed up at or after SINCE, when given."""
    query = select(Subscriber).order_by(Subscriber.id)
    if status is not None:
        query = query.where(Subscriber.status == status)
    if search:
        query = query.where(Subscriber.email_key.contains(search.lower(), autoescape=True))
    if since is not None:
        query = query.where(func.coalesce(Subscriber.subscribed_at, Subscriber.created_at) >= since)
    with nl.sessions() as session:
        yield from session.scalars(query).yield_per(1000)


def export(nl: Newsletter) -> Iterator[list[str]]:
    """The CSV rows of an export: the header, then every subscriber with their consent record."""
    yield EXPORT_COLUMNS
    for subscriber in listing(nl):
        yield export_row(subscriber)
