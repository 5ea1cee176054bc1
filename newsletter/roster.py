"""The owner's side of the subscriber list: add and remove by hand, list, import and export with the
consent record."""

from __future__ import annotations

import csv
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO

from email_validator import ValidatedEmail
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .models import Delivery, Status, Subscriber, utcnow
from .runtime import Newsletter
from .subscriptions import Requester, email_key, normalize


class ImportFileError(ValueError):
    """The file as a whole cannot be imported; the message says why and what to do."""


@dataclass
class ImportReport:
    imported: int = 0
    skipped: list[str] = field(default_factory=list)


def find(session: Session, raw: str) -> Subscriber | None:
    return session.scalar(select(Subscriber).where(Subscriber.email_key == email_key(normalize(raw))))


def _get_or_create(session: Session, validated: ValidatedEmail, status: Status) -> tuple[Subscriber, bool]:
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
    session: Session, raw: str, confirmed: bool, requester: Requester, force: bool = False
) -> tuple[Subscriber, bool]:
    """An address added by the owner; returns (subscriber, created).

    CONFIRMED confirms a new or unconfirmed address; one that unsubscribed or bounced stays so (LeftTheList)
    unless FORCE, and then the consent record says the owner confirmed it, when, and that it was forced.
    """
    subscriber, created = _get_or_create(session, normalize(raw), Status.UNCONFIRMED)
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
_TIMES = [c for c in EXPORT_COLUMNS if c.endswith("_at")]
_IPS = [c for c in EXPORT_COLUMNS if c.endswith("_ip")]


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: str) -> str:
    """CELL as a spreadsheet shows it and never runs it: a leading ' before what starts a formula (OWASP)."""
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell


def from_spreadsheet(cell: str) -> str:
    """A cell as spreadsheet_safe wrote it, back as it was."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(FORMULA_STARTS) else cell


def export_row(subscriber: Subscriber) -> list[str]:
    values = []
    for column in EXPORT_COLUMNS:
        value = getattr(subscriber, column)
        text = value.value if isinstance(value, Status) else value.isoformat() if isinstance(value, datetime) else value
        values.append(spreadsheet_safe(text or ""))
    return values


def import_row(session: Session, row: dict[str, str]) -> bool:
    """Add the subscriber a CSV row describes (the columns of an export; only email is required).

    Returns False when the address is already a subscriber (left as it is); raises ValueError saying
    what is wrong with the row.
    """
    status = (row.get("status") or Status.CONFIRMED.value).lower()
    if status not in {s.value for s in Status}:
        raise ValueError(f"status {status!r} is not one of {', '.join(s.value for s in Status)}")
    times = {}
    for column in _TIMES:
        if row.get(column):
            try:
                parsed = datetime.fromisoformat(row[column])
                times[column] = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
            except (ValueError, OverflowError):
                raise ValueError(
                    f"{column} {row[column]!r} is not a date and time like 2026-01-31T12:00:00+00:00"
                ) from None
    ips = {}
    for column in _IPS:
        if row.get(column):
            try:
                ips[column] = str(ipaddress.ip_address(row[column]))
            except ValueError:
                raise ValueError(f"{column} {row[column]!r} is not an IP address") from None
    if find(session, row.get("email", "")) is not None:
        return False  # an import never changes a subscriber who is already on the list
    subscriber, created = add(session, row.get("email", ""), status == Status.CONFIRMED.value, Requester.admin())
    if not created:
        return False
    subscriber.status = Status(status)
    for column, value in times.items():
        setattr(subscriber, column, value)
    for column, ip in ips.items():
        setattr(subscriber, column, ip)
    return True


def remove(session: Session, subscriber: Subscriber) -> None:
    """Delete the subscriber with their deliveries; queued emails and throttle records go by ON DELETE CASCADE."""
    session.execute(delete(Delivery).where(Delivery.subscriber_id == subscriber.id))
    session.delete(subscriber)


def add_subscriber(nl: Newsletter, raw: str, confirmed: bool, force: bool = False) -> tuple[str, Status, bool]:
    """Add an address from the command line; returns (address, status, created).

    Raises InvalidAddress, or LeftTheList for an address that left when CONFIRMED is asked without FORCE.
    """
    with nl.sessions.begin() as session:
        subscriber, created = add(session, raw, confirmed, Requester.admin(), force)
        return subscriber.email, subscriber.status, created


def remove_subscriber(nl: Newsletter, raw: str) -> str | None:
    """Delete the subscriber with address RAW and all their data; returns the address, or None if unknown."""
    with nl.sessions.begin() as session:
        subscriber = find(session, raw)
        if subscriber is None:
            return None
        remove(session, subscriber)
        return subscriber.email


def listing(nl: Newsletter, status: Status | None = None) -> Iterator[Subscriber]:
    """Every subscriber (with STATUS, when given), oldest first, read a thousand at a time."""
    query = select(Subscriber).order_by(Subscriber.id)
    if status is not None:
        query = query.where(Subscriber.status == status)
    with nl.sessions() as session:
        yield from session.scalars(query).yield_per(1000)


def export(nl: Newsletter) -> Iterator[list[str]]:
    """The CSV rows of an export: the header, then every subscriber with their consent record."""
    yield EXPORT_COLUMNS
    for subscriber in listing(nl):
        yield export_row(subscriber)


def import_csv(nl: Newsletter, file: TextIO) -> ImportReport:
    """Import FILE (CSV with an email column): one transaction, each row on its own savepoint.

    Raises ImportFileError when the file is not UTF-8 CSV with a header naming an email column.
    """
    name = getattr(file, "name", "the file")
    report = ImportReport()
    try:
        reader = csv.DictReader(file)
        if not reader.fieldnames or "email" not in [f.strip().lower() for f in reader.fieldnames]:
            raise ImportFileError(f"{name}: the first line must name the columns, with one called email")
        with nl.sessions.begin() as session:
            for raw_row in reader:
                row = {
                    (k or "").strip().lower(): from_spreadsheet((v or "").strip())
                    for k, v in raw_row.items()
                    if isinstance(v, str)
                }
                try:
                    with session.begin_nested():
                        created = import_row(session, row)
                except ValueError as exc:
                    report.skipped.append(f"line {reader.line_num}: {row.get('email', '')!r}: {exc}")
                    continue
                if created:
                    report.imported += 1
                else:
                    report.skipped.append(f"line {reader.line_num}: {row['email']} is already a subscriber")
    except UnicodeDecodeError:
        raise ImportFileError(f"{name}: not UTF-8 text; save the file as CSV UTF-8 and import it again") from None
    except csv.Error as exc:
        raise ImportFileError(f"{name}: not a CSV file ({exc})") from None
    return report
