"""The owner's side of the subscriber list: add and remove by hand, list, import and export with the
consent record."""

from __future__ import annotations

import csv
import hashlib
import hmac
import ipaddress
import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

from email_validator import ValidatedEmail
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import db
from .models import DIGESTS, ERASED, SUBSCRIBERS, Delivery, Erased, OutboxMessage, Status, Subscriber, utcnow
from .runtime import Newsletter
from .subscriptions import Requester, email_key, normalize, subscribe


class ImportFileError(ValueError):
    """The file as a whole cannot be imported; the message says why and what to do."""


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


IMPORT_CHUNK_ROWS = 1000


def _row_values(row: dict[str, str], now: datetime, frequency: str) -> dict[str, object]:
    """The subscriber a CSV row describes (the columns of an export; only email is required), as the
    columns of a new row; raises ValueError saying what is wrong with the row."""
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
    validated = normalize(row.get("email", ""))
    confirmed = status == Status.CONFIRMED.value
    agent = Requester.admin().user_agent
    return {
        "email": validated.normalized,
        "email_key": email_key(validated),
        "email_ascii": validated.ascii_email or validated.normalized,
        "status": Status(status),
        "created_at": times.get("created_at", now),
        "subscribed_at": times.get("subscribed_at", now),
        "subscribed_ip": ips.get("subscribed_ip"),
        "subscribed_user_agent": agent,
        "confirmed_at": times.get("confirmed_at", now if confirmed else None),
        "confirmed_ip": ips.get("confirmed_ip"),
        "confirmed_user_agent": agent if confirmed else None,
        "unsubscribed_at": times.get("unsubscribed_at"),
        "unsubscribed_ip": ips.get("unsubscribed_ip"),
        "frequency": frequency,
    }


@dataclass
class ImportReport:
    """What an import did so far; `listed` has (line, why) for every row not imported, when asked for."""

    rows: int | None = None  # in the file, when it could be read through before the import
    read: int = 0
    imported: int = 0
    already: int = 0
    refused: int = 0
    listed: list[tuple[int, str]] | None = None
    stopped_by: KeyboardInterrupt | None = None  # Ctrl-C or a stop signal: the rows committed are kept

    def skip(self, line: int, why: str, refused: bool) -> None:
        if refused:
            self.refused += 1
        else:
            self.already += 1
        if self.listed is not None:
            self.listed.append((line, why))


ImportProgress = Callable[[ImportReport], None]


@contextmanager
def _file_errors(name: str) -> Iterator[None]:
    """ImportFileError for a file that is not UTF-8 CSV."""
    try:
        yield
    except UnicodeDecodeError:
        raise ImportFileError(f"{name}: not UTF-8 text; save the file as CSV UTF-8 and import it again") from None
    except csv.Error as exc:
        raise ImportFileError(f"{name}: not a CSV file ({exc})") from None


def _csv_rows(file: TextIO, name: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for every row of FILE, its column names and cells trimmed and spreadsheet quotes
    taken off; ImportFileError when the header names no email column."""
    reader = csv.DictReader(file)
    if not reader.fieldnames or "email" not in [f.strip().lower() for f in reader.fieldnames]:
        raise ImportFileError(f"{name}: the first line must name the columns, with one called email")
    for raw_row in reader:
        row = {
            (k or "").strip().lower(): from_spreadsheet((v or "").strip())
            for k, v in raw_row.items()
            if isinstance(v, str)
        }
        yield reader.line_num, row


def _rows_in(file: TextIO, name: str) -> int | None:
    """The rows of FILE, read through once to refuse a malformed file before anything is imported; None when
    it cannot be read twice (a pipe)."""
    if not file.seekable():
        return None
    start = file.tell()
    rows = sum(1 for _ in _csv_rows(file, name))
    file.seek(start)
    return rows


def _insert_chunk(nl: Newsletter, rows: list[dict[str, object]]) -> set[str]:
    """Insert the ROWS whose addresses are not on the list, in one short transaction; returns their email keys.

    Nobody on the list is changed. An address that someone else adds between the two statements (possible
    on PostgreSQL) is left as they added it, though counted here.
    """
    with nl.engine.begin() as conn:
        keys = [str(row["email_key"]) for row in rows]
        there = set(conn.scalars(select(SUBSCRIBERS.c.email_key).where(db.one_of(SUBSCRIBERS.c.email_key, keys, conn))))
        new = [row for row in rows if row["email_key"] not in there]
        if new:  # many rows at once, without RETURNING: several times faster on PostgreSQL
            conn.execute(
                db.insert_for(conn)(SUBSCRIBERS).on_conflict_do_nothing(index_elements=[SUBSCRIBERS.c.email_key]), new
            )
        return {str(row["email_key"]) for row in new}


def _erased(nl: Newsletter, keys: list[str]) -> set[str]:
    """The email keys among KEYS whose readers asked to be erased."""
    hashes = {erased_key(nl, key): key for key in keys}
    with nl.engine.connect() as conn:
        found = conn.scalars(select(ERASED.c.key_hash).where(db.one_of(ERASED.c.key_hash, list(hashes), conn)))
        return {hashes[h] for h in found}


def _import_chunk(nl: Newsletter, chunk: list[tuple[int, dict[str, str]]], report: ImportReport) -> None:
    """Check the rows of CHUNK, insert the new addresses among them and count every row in REPORT."""
    now, listed_before = utcnow(), len(report.listed or [])
    new: dict[str, tuple[int, dict[str, object]]] = {}
    for line, row in chunk:
        try:
            values = _row_values(row, now, nl.config.digest.default_frequency)
        except ValueError as exc:
            report.skip(line, f"{row.get('email', '')!r}: {exc}", refused=True)
            continue
        key = str(values["email_key"])
        if key in new:
            report.skip(line, f"{values['email']} is already a subscriber", refused=False)
        else:
            new[key] = (line, values)
    for key in _erased(nl, list(new)):
        line, values = new.pop(key)
        report.skip(line, f"{values['email']} was erased at the reader's request", refused=True)
    inserted = _insert_chunk(nl, [values for _, values in new.values()]) if new else set()
    for key, (line, values) in new.items():
        if key in inserted:
            report.imported += 1
        else:
            report.skip(line, f"{values['email']} is already a subscriber", refused=False)
    if report.listed:
        report.listed[listed_before:] = sorted(report.listed[listed_before:])
    report.read += len(chunk)


def _import_rows(
    nl: Newsletter, file: TextIO, name: str, report: ImportReport, progress: ImportProgress, stop: threading.Event
) -> None:
    with _file_errors(name):
        rows = _csv_rows(file, name)
        while not stop.is_set():
            chunk = list(itertools.islice(rows, IMPORT_CHUNK_ROWS))
            if not chunk:
                return
            _import_chunk(nl, chunk, report)
            progress(report)


def import_csv(
    nl: Newsletter, file: TextIO, listed: bool = False, progress: ImportProgress | None = None
) -> ImportReport:
    """Import FILE (CSV with an email column), committing IMPORT_CHUNK_ROWS rows at a time so that the sign-up
    form never waits long for the database. An address already on the list is left as it is.

    LISTED keeps a line for every row not imported; PROGRESS is called before the first chunk and after
    each. Ctrl-C or a stop signal ends the import after the chunk in hand is committed (report.stopped_by).
    Raises ImportFileError when the file is not UTF-8 CSV with a header naming an email column.
    """
    name = getattr(file, "name", "the file")
    with _file_errors(name):
        report = ImportReport(rows=_rows_in(file, name), listed=[] if listed else None)
    progress = progress or (lambda report: None)
    progress(report)
    failed: list[BaseException] = []
    stop = threading.Event()

    def work() -> None:
        try:
            _import_rows(nl, file, name, report, progress, stop)
        except BaseException as exc:
            failed.append(exc)

    worker = threading.Thread(target=work, name="import", daemon=True)
    worker.start()
    try:
        worker.join()
    except KeyboardInterrupt as interrupt:  # the chunk in hand is committed and counted
        stop.set()
        worker.join()
        report.stopped_by = interrupt
    if failed:
        raise failed[0]
    return report
