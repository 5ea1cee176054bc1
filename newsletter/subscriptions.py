"""What a reader does: sign up, confirm, unsubscribe; and the confirmation emails that go with it.

The owner's side (add, remove, import, export) is in roster.py."""

from __future__ import annotations

import functools
import secrets
import time
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from email_validator import EmailNotValidError, ValidatedEmail, validate_email
from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
from sqlalchemy.orm import Session

from . import db
from .config import FREQUENCIES
from .i18n import N_
from .messages import MessageTemplate, single_message, single_template
from .models import CONFIRMATIONS, OUTBOX, SUBSCRIBERS, Status, Subscriber, utcnow
from .ratelimit import SignupCeiling, network_of
from .runtime import Newsletter
from .text import clean_field

CONFIRM_RESEND_INTERVAL = timedelta(minutes=10)
CONFIRMATIONS_PER_DAY = 3
MAX_ADDRESS_LENGTH = 254


class InvalidAddress(ValueError):
    """Not an email address we can send to; the message says why, for the reader."""


@dataclass(frozen=True)
class Requester:
    """Who asked, for the consent record."""

    ip: str | None = None
    user_agent: str | None = None

    @classmethod
    def admin(cls) -> Requester:
        return cls(ip=None, user_agent="newsletter command line")

    @classmethod
    def unsubscribe_email(cls) -> Requester:
        """An email to the List-Unsubscribe address (inbound.py)."""
        return cls(user_agent="email to the List-Unsubscribe address")

    @classmethod
    def spam_complaint(cls) -> Requester:
        """A mail provider's report that the reader marked one of our emails as spam (inbound.py)."""
        return cls(user_agent="spam complaint (ARF abuse report)")


def normalize(raw: str) -> ValidatedEmail:
    address = raw.strip()
    if not address:
        raise InvalidAddress(N_("Please enter your email address."))
    if len(address) > MAX_ADDRESS_LENGTH:
        raise InvalidAddress(N_("That address is too long to be an email address."))
    try:
        return validate_email(address, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise InvalidAddress(str(exc)) from None


def email_key(validated: ValidatedEmail) -> str:
    return validated.normalized.lower()


NOT_AN_ADDRESS = N_("This is not an email address we can write to. Check it for typos.")
EMAIL_VALIDATOR_WORDS = (  # email-validator's commonest reasons, for the catalogs; the rest read as NOT_AN_ADDRESS
    N_("An email address must have an @-sign."),
    N_("There must be something before the @-sign."),
    N_("There must be something after the @-sign."),
    N_("The part after the @-sign is not valid. It should have a period."),
    N_("An email address cannot have two periods in a row."),
    N_("An email address cannot start with a period."),
    N_("An email address cannot end with a period."),
    N_("An email address cannot have a period immediately before the @-sign."),
    N_("An email address cannot have a period immediately after the @-sign."),
)


GMAIL_DOMAINS = ("gmail.com", "googlemail.com")


def throttle_key(validated: ValidatedEmail) -> str:
    """The mailbox an address reaches, however a bomber spells it: case and +tags folded together, and for
    Gmail the dots and the googlemail.com alias too. Used only for counting."""
    local = validated.local_part.split("+", 1)[0].lower()
    domain = (validated.ascii_domain or validated.domain).lower()
    if domain in GMAIL_DOMAINS:
        local, domain = local.replace(".", ""), GMAIL_DOMAINS[0]
    return f"{local}@{domain}"


def forget_unconfirmed(nl: Newsletter) -> int:
    """Delete what is left of sign-ups never confirmed within [web] unconfirmed_days: unconfirmed readers
    with their personal data and emails (by ON DELETE CASCADE), the pending sign-ups of readers who left,
    and confirmation emails never delivered. Returns how many unconfirmed readers were deleted."""
    cutoff = utcnow() - timedelta(days=nl.config.web.unconfirmed_days)
    last_signup = func.coalesce(SUBSCRIBERS.c.pending_at, SUBSCRIBERS.c.subscribed_at, SUBSCRIBERS.c.created_at)
    with nl.engine.begin() as conn:
        stale = delete(SUBSCRIBERS).where(SUBSCRIBERS.c.status == Status.UNCONFIRMED, last_signup < cutoff)
        forgotten: int = conn.execute(stale).rowcount
        conn.execute(
            update(SUBSCRIBERS)
            .where(SUBSCRIBERS.c.pending_at < cutoff)
            .values(pending_at=None, pending_ip=None, pending_user_agent=None, confirm_nonce=None)
        )
        conn.execute(
            delete(OUTBOX).where(
                OUTBOX.c.kind == "confirmation", OUTBOX.c.sent_at.is_(None), OUTBOX.c.created_at < cutoff
            )
        )
    return forgotten


def ceiling(nl: Newsletter) -> SignupCeiling:
    return SignupCeiling(nl.config.web.signup_ceiling, nl.config.web.network_ceiling)


def release_held(nl: Newsletter) -> int:
    """Let held confirmation emails go once no network, and not the whole form, is over its ceiling."""
    with nl.engine.begin() as conn:
        if ceiling(nl).flooded(conn, time.time()):
            return 0
        return conn.execute(update(OUTBOX).where(OUTBOX.c.held.is_(True)).values(held=False)).rowcount


def subscribe(
    session: Session,
    nl: Newsletter,
    raw: str,
    requester: Requester,
    at: datetime | None = None,
    network: str | None = None,
) -> None:
    """Record a sign-up made AT (default now) from NETWORK (default: the requester's) and queue a
    confirmation email, within the per-address limits (see Enrolment)."""
    validated = normalize(raw)
    enrolment = Enrolment(session.connection(), nl, [validated])
    when = at or utcnow()
    if network is None:
        network = network_of(requester.ip or "")
    enrolment.add(validated, requester, when, ceiling(nl).holds(enrolment.conn, network, when.timestamp()))
    enrolment.finish()


class Enrolment:
    """Sign-ups recorded one after another in one transaction, each as subscriptions.subscribe describes it.

    An address already on the list keeps its status and consent record: the sign-up waits in pending_*
    until its confirmation is clicked, so nobody can re-subscribe a reader who left. A confirmation email
    goes out at most CONFIRMATIONS_PER_DAY times a day to one mailbox (throttle_key), CONFIRM_RESEND_INTERVAL
    apart; during a flood (ratelimit.SignupCeiling) it is stored but held until the rate falls again, so a
    bot submitting many strangers' addresses cannot flood them.

    The addresses signing up are given up front: the confirmations of the mailboxes they reach are read
    once, and on PostgreSQL those mailboxes are locked until the transaction ends, so concurrent workers
    take turns per mailbox.
    The confirmation email is rendered once; finish() writes what the sign-ups queued.
    """

    def __init__(self, conn: Connection, nl: Newsletter, addresses: Collection[ValidatedEmail]) -> None:
        self.conn, self.nl = conn, nl
        mailboxes = {throttle_key(validated) for validated in addresses}
        db.advisory_xact_lock(conn, *mailboxes)
        self.now = utcnow()
        self.sent: dict[str, list[datetime]] = defaultdict(list)
        recent = select(CONFIRMATIONS.c.throttle_key, CONFIRMATIONS.c.sent_at).where(
            CONFIRMATIONS.c.throttle_key.in_(mailboxes), CONFIRMATIONS.c.sent_at > self.now - timedelta(days=1)
        )
        for key, sent_at in conn.execute(recent):
            self.sent[key].append(sent_at)
        columns = ("email", "email_key", "email_ascii", "status", "subscribed_at", "subscribed_ip")
        new_reader: dict[str, Any] = {name: bindparam(name) for name in (*columns, "subscribed_user_agent")}
        self._insert = db.DriverStatement(
            conn.engine,
            db.insert_for(conn)(SUBSCRIBERS)
            .values(created_at=self.now, frequency=nl.config.digest.default_frequency, bounce_score=0.0, **new_reader)
            .on_conflict_do_nothing(index_elements=[SUBSCRIBERS.c.email_key])
            .returning(SUBSCRIBERS.c.id),
        )
        self.nonces: list[dict[str, object]] = []
        self.confirmations: list[dict[str, object]] = []
        self.emails: list[dict[str, object]] = []

    @functools.cached_property
    def template(self) -> MessageTemplate:
        nl = self.nl
        subject = nl.language.gettext("Confirm your subscription to %(name)s", name=nl.config.site.name)
        return single_template(
            nl.config, nl.render, "confirmation", subject, max_age_hours=nl.config.security.confirm_max_age_hours
        )

    def add(self, validated: ValidatedEmail, requester: Requester, at: datetime, held: bool) -> None:
        """The sign-up of VALIDATED (one of the addresses given) made AT; HELD: its email waits out a flood."""
        conn, now = self.conn, self.now
        seen = {
            "status": Status.UNCONFIRMED,
            "subscribed_at": at,
            "subscribed_ip": clean_field(requester.ip, 64),
            "subscribed_user_agent": clean_field(requester.user_agent, 512),
        }
        key = email_key(validated)
        recipient = validated.ascii_email or validated.normalized
        values = {"email": validated.normalized, "email_key": key, "email_ascii": recipient, **seen}
        row = self._insert.execute(self.conn.connection.cursor(), **values).fetchone()
        subscriber_id = row[0] if row else None
        if subscriber_id is None:
            subscriber_id, status = conn.execute(
                select(SUBSCRIBERS.c.id, SUBSCRIBERS.c.status).where(SUBSCRIBERS.c.email_key == key)
            ).one()
            if status in (Status.CONFIRMED, Status.BOUNCED):
                return
            pending = {"pending_at": at, "pending_ip": seen["subscribed_ip"]}
            pending["pending_user_agent"] = seen["subscribed_user_agent"]
            conn.execute(update(SUBSCRIBERS).where(SUBSCRIBERS.c.id == subscriber_id).values(**pending))
        mailbox = throttle_key(validated)
        sent = self.sent[mailbox]
        if len(sent) >= CONFIRMATIONS_PER_DAY or any(now - earlier < CONFIRM_RESEND_INTERVAL for earlier in sent):
            return
        sent.append(now)
        nonce = secrets.token_urlsafe(12)
        self.nonces.append({"reader": subscriber_id, "nonce": nonce})
        self.confirmations.append({"throttle_key": mailbox, "subscriber_id": subscriber_id, "sent_at": now})
        template = self.template
        message = template.render(
            recipient, template.new_message_id(), confirm_url=self.nl.confirm_url(subscriber_id, nonce)
        )
        self.emails.append(_outbox_row(self.nl, subscriber_id, recipient, "confirmation", message, held, now))

    def finish(self) -> None:
        """Write the nonces, confirmations and emails of the sign-ups added."""
        conn = self.conn
        if self.nonces:
            by_id = SUBSCRIBERS.c.id == bindparam("reader")
            conn.execute(update(SUBSCRIBERS).where(by_id).values(confirm_nonce=bindparam("nonce")), self.nonces)
            conn.execute(insert(CONFIRMATIONS), self.confirmations)
            conn.execute(insert(OUTBOX), self.emails)
        self.nonces, self.confirmations, self.emails = [], [], []


def confirmable(subscriber: Subscriber, nonce: str) -> bool:
    """Whether a confirmation link with NONCE may confirm SUBSCRIBER: only the newest link, only for a
    sign-up still waiting (an unconfirmed reader, or one who left and signed up again)."""
    waiting = subscriber.status in (Status.UNCONFIRMED, Status.UNSUBSCRIBED)
    return waiting and subscriber.confirm_nonce is not None and subscriber.confirm_nonce == nonce


def confirm(session: Session, subscriber: Subscriber, nl: Newsletter, requester: Requester) -> None:
    """The reader clicked the link: the pending sign-up, if any, becomes their consent record."""
    if subscriber.pending_at is not None:
        subscriber.subscribed_at, subscriber.subscribed_ip = subscriber.pending_at, subscriber.pending_ip
        subscriber.subscribed_user_agent = subscriber.pending_user_agent
        subscriber.unsubscribed_at = subscriber.unsubscribed_ip = subscriber.unsubscribed_user_agent = None
        subscriber.pending_at = subscriber.pending_ip = subscriber.pending_user_agent = None
    subscriber.status = Status.CONFIRMED
    subscriber.confirm_nonce = None
    subscriber.confirmed_at = utcnow()
    subscriber.confirmed_ip = clean_field(requester.ip, 64)
    subscriber.confirmed_user_agent = clean_field(requester.user_agent, 512)
    queue_email(
        session,
        nl,
        subscriber.id,
        subscriber.email_ascii,
        "welcome",
        nl.language.gettext("You're subscribed to %(name)s", name=nl.config.site.name),
        unsubscribe_url=nl.unsubscribe_url(subscriber.id),
        manage_url=nl.manage_url(subscriber.id),
        frequency=subscriber.frequency,
    )


def set_frequency(subscriber: Subscriber, frequency: str) -> bool:
    """The reader chose instant, daily or weekly email; returns whether it changed.

    Posts already waiting for a digest stay waiting: they go in the next digest of the new frequency, or at
    once (one email of them) when the reader is back on instant email. Nothing is lost or sent twice.
    """
    if frequency not in FREQUENCIES:
        raise ValueError(f"frequency must be one of {', '.join(FREQUENCIES)}, not {frequency!r}")
    changed = subscriber.frequency != frequency
    subscriber.frequency = frequency
    return changed


def unsubscribe(subscriber: Subscriber, requester: Requester) -> bool:
    """Returns False when they had already left."""
    if subscriber.status in (Status.UNSUBSCRIBED, Status.BOUNCED):
        return False
    subscriber.status = Status.UNSUBSCRIBED
    subscriber.confirm_nonce = None
    subscriber.unsubscribed_at = utcnow()
    subscriber.unsubscribed_ip = clean_field(requester.ip, 64)
    subscriber.unsubscribed_user_agent = clean_field(requester.user_agent, 512)
    return True


def queue_email(
    conn: Session | Connection,
    nl: Newsletter,
    subscriber_id: int,
    recipient: str,
    kind: str,
    subject: str,
    **context: object,
) -> None:
    message = single_message(nl.config, nl.render, kind, subject, recipient, **context)
    conn.execute(insert(OUTBOX).values(_outbox_row(nl, subscriber_id, recipient, kind, message, False, utcnow())))


def _outbox_row(
    nl: Newsletter, subscriber_id: int, recipient: str, kind: str, message: bytes, held: bool, now: datetime
) -> dict[str, object]:
    return {
        "subscriber_id": subscriber_id,
        "kind": kind,
        "sender": nl.from_addr_spec,
        "recipient": recipient,
        "message": message,
        "held": held,
        "created_at": now,
        "next_attempt_at": now,
        "attempts": 0,
    }
