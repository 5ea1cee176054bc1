"""`subscribers import`: CSV files of our own export and of other services', recognised by their columns."""

from __future__ import annotations

import csv
import ipaddress
import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO

from sqlalchemy import Connection, select

from . import db, threads
from .models import ERASED, SUBSCRIBERS, Status, utcnow
from .roster import EXPORT_COLUMNS, erased_key, from_spreadsheet
from .runtime import Newsletter
from .subscriptions import Requester, email_key, normalize

_TIMES = [c for c in EXPORT_COLUMNS if c.endswith("_at")]
_IPS = [c for c in EXPORT_COLUMNS if c.endswith("_ip")]


class ImportFileError(ValueError):
    """The file as a whole cannot be imported; the message says why and what to do."""


IMPORT_CHUNK_ROWS = 1000


class _NeverConfirmed(Exception):
    """A row whose reader never confirmed at the service it comes from: not imported (that would need an email)."""


def _truthy(value: str) -> bool:
    return value.strip().lower() in {"true", "t", "yes", "y", "1"}


def _our_status(row: dict[str, str]) -> str:
    return row.get("status", "")


def _feedburner_status(row: dict[str, str]) -> str:
    status = " ".join(row.get("status", "").split())
    if status.lower() == "active":
        return Status.CONFIRMED.value
    if status.lower() == "pending verification":
        raise _NeverConfirmed(status)
    raise ValueError(f"Status {status!r} is not Active or Pending Verification")


def _substack_status(row: dict[str, str]) -> str:
    return Status.UNSUBSCRIBED.value if _truthy(row.get("email_disabled", "")) else Status.CONFIRMED.value


def _always(status: Status) -> Callable[[dict[str, str]], str]:
    return lambda row: status.value


@dataclass(frozen=True)
class ImportFormat:
    """A kind of subscriber file, told by the columns of its first line (in lower case here)."""

    name: str  # "a Mailchimp audience export"
    source: str  # "Mailchimp", for the consent record and messages; "" for this newsletter's own format
    email: str  # the column of addresses
    columns: dict[str, str]  # our export's column -> the file's, for times and IP addresses
    status: Callable[[dict[str, str]], str]  # the row's status (one of Status), raising _NeverConfirmed or ValueError
    note: str = ""  # how its rows are imported, when that needs saying

    def convert(self, row: dict[str, str]) -> dict[str, str]:
        """ROW as the columns of our export."""
        ours = {"email": row.get(self.email, ""), "status": self.status(row)}
        ours.update((column, row.get(theirs, "")) for column, theirs in self.columns.items())
        return ours


OUR_FORMAT = ImportFormat("a list with an email column", "", "email", {c: c for c in EXPORT_COLUMNS[2:]}, _our_status)
_NEVER_MAILED = "imported as {}, never mailed"
_MAILCHIMP_IDS = {"optin_time", "optin_ip", "confirm_time", "confirm_ip", "member_rating", "leid", "euid"}
_MAILCHIMP_CONSENT = {
    "subscribed_at": "optin_time",
    "subscribed_ip": "optin_ip",
    "confirmed_at": "confirm_time",
    "confirmed_ip": "confirm_ip",
}
_JETPACK_DATES = ("date_subscribed", "subscribed", "subscription_date")
EXPECTED_EMAIL_COLUMNS = (
    "email (this newsletter's export, Substack, FeedBurner), Email Address (Mailchimp) "
    "or email_address (WordPress.com/Jetpack)"
)


def recognise(columns: list[str]) -> ImportFormat | None:
    """The format of a file whose first line names COLUMNS (trimmed, lower case); None without an email column."""
    has = set(columns)
    if has & _MAILCHIMP_IDS and has & {"email address", "email"}:
        email = "email address" if "email address" in has else "email"
        if "unsub_time" in has:
            return ImportFormat(
                "a Mailchimp audience export",
                "Mailchimp",
                email,
                {**_MAILCHIMP_CONSENT, "unsubscribed_at": "unsub_time"},
                _always(Status.UNSUBSCRIBED),
                "unsubscribed contacts: " + _NEVER_MAILED.format("unsubscribed"),
            )
        if "clean_time" in has:
            return ImportFormat(
                "a Mailchimp audience export",
                "Mailchimp",
                email,
                _MAILCHIMP_CONSENT,
                _always(Status.BOUNCED),
                "cleaned contacts, whose address bounced: " + _NEVER_MAILED.format("bounced"),
            )
        return ImportFormat(
            "a Mailchimp audience export", "Mailchimp", email, _MAILCHIMP_CONSENT, _always(Status.CONFIRMED)
        )
    if "email" in has and has & {"active_subscription", "email_disabled"}:
        return ImportFormat(
            "a Substack subscriber export",
            "Substack",
            "email",
            {"subscribed_at": "created_at"},
            _substack_status,
            "readers with email_disabled: " + _NEVER_MAILED.format("unsubscribed"),
        )
    if {"email", "subscribed", "status"} <= has:
        return ImportFormat(
            "a FeedBurner subscriber export",
            "FeedBurner",
            "email",
            {"subscribed_at": "subscribed"},
            _feedburner_status,
            "Pending Verification rows are skipped: they never confirmed, and an import sends no email",
        )
    dates = [column for column in _JETPACK_DATES if column in has]
    if "email_address" in has or ("email" in has and dates and not has & set(EXPORT_COLUMNS[1:])):
        return ImportFormat(
            "a WordPress.com/Jetpack subscriber export",
            "WordPress.com",
            "email_address" if "email_address" in has else "email",
            {"subscribed_at": dates[0]} if dates else {},
            _always(Status.CONFIRMED),
        )
    return OUR_FORMAT if "email" in has else None


_SEPARATORS = {",": "commas", ";": "semicolons", "\t": "tabs"}


def _delimiter(header: str) -> str:
    """The separator of a CSV file by its first line: a comma unless semicolons or tabs outnumber commas."""
    counts = {sep: header.count(sep) for sep in _SEPARATORS}
    best = max(counts, key=lambda sep: counts[sep])
    return best if counts[best] > counts[","] else ","


@dataclass(frozen=True)
class ImportLayout:
    """What a file to import was recognised as: its format, separator and column names as the file spells them."""

    format: ImportFormat
    delimiter: str = ","
    spelled: dict[str, str] = field(default_factory=dict)  # lower case -> as in the file

    def describe(self) -> str | None:
        """What the owner is told the file is, or None for this newsletter's own format separated by commas."""
        if self.format is OUR_FORMAT and self.delimiter == ",":
            return None
        text = self.format.name
        if self.delimiter != ",":
            text += f", separated by {_SEPARATORS[self.delimiter]}"
        return text + (f" ({self.format.note})" if self.format.note else "")

    @property
    def user_agent(self) -> str:
        """Who recorded the consent of an imported row, in its consent record."""
        agent = Requester.admin().user_agent or ""
        return f"{agent}: import from {self.format.source}" if self.format.source else agent

    def labels(self) -> dict[str, str]:
        """Our column -> the file's column, as the file spells it, for messages about a row."""
        return {ours: self.spelled.get(theirs, theirs) for ours, theirs in self.format.columns.items()}


def _row_values(
    row: dict[str, str],
    now: datetime,
    frequency: str,
    agent: str | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, object]:
    """The subscriber a CSV row describes (the columns of an export; only email is required), as the
    columns of a new row; raises ValueError saying what is wrong with the row, naming the column by LABELS."""
    labels = labels or {}
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
                label = labels.get(column, column)
                raise ValueError(
                    f"{label} {row[column]!r} is not a date and time like 2026-01-31T12:00:00+00:00"
                ) from None
    ips = {}
    for column in _IPS:
        if row.get(column):
            try:
                ips[column] = str(ipaddress.ip_address(row[column]))
            except ValueError:
                raise ValueError(f"{labels.get(column, column)} {row[column]!r} is not an IP address") from None
    validated = normalize(row.get("email", ""))
    confirmed = status == Status.CONFIRMED.value
    agent = agent or Requester.admin().user_agent
    confirmed_at = times.get("confirmed_at", now if confirmed else None)
    unsubscribed_at = times.get("unsubscribed_at")
    return {
        "email": validated.normalized,
        "email_key": email_key(validated),
        "email_ascii": validated.ascii_email or validated.normalized,
        "status": Status(status),
        "created_at": times.get("created_at", now),
        "subscribed_at": times.get("subscribed_at", times.get("confirmed_at", now)),
        "subscribed_ip": ips.get("subscribed_ip"),
        "subscribed_user_agent": agent,
        "confirmed_at": confirmed_at,
        "confirmed_ip": ips.get("confirmed_ip"),
        "confirmed_user_agent": agent if confirmed_at is not None else None,
        "unsubscribed_at": unsubscribed_at,
        "unsubscribed_ip": ips.get("unsubscribed_ip"),
        "unsubscribed_user_agent": agent if unsubscribed_at is not None else None,
        "frequency": frequency,
    }


@dataclass
class ImportReport:
    """What an import did so far; `listed` has (line, why) for every row not imported, when asked for."""

    rows: int | None = None  # in the file, when it could be read through before the import
    read: int = 0
    imported: int = 0  # or, in a dry run, that would be
    already: int = 0
    refused: int = 0
    never_confirmed: int = 0  # rows whose reader never confirmed at the service the file comes from: skipped
    listed: list[tuple[int, str]] | None = None
    stopped_by: KeyboardInterrupt | None = None  # Ctrl-C or a stop signal: the rows committed are kept
    dry_run: bool = False
    layout: ImportLayout | None = None
    seen: set[str] = field(default_factory=set, repr=False)  # in a dry run, the email keys it would have imported

    def skip(self, line: int, why: str, refused: bool) -> None:
        if refused:
            self.refused += 1
        else:
            self.already += 1
        self._list(line, why)

    def skip_never_confirmed(self, line: int, why: str) -> None:
        self.never_confirmed += 1
        self._list(line, why)

    def _list(self, line: int, why: str) -> None:
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


def _shown(columns: list[str]) -> str:
    """The columns a file's first line names, on one line and cut short."""
    shown = ", ".join(repr(column[:40]) for column in columns[:8] if column)
    return (shown + (", …" if len(columns) > 8 else "")) if shown else "nothing"


def _csv_rows(header: str, file: TextIO, name: str) -> tuple[ImportLayout, Iterator[tuple[int, dict[str, str]]]]:
    """The layout of FILE, whose first line HEADER was read, and (line number, row) for every row, its column names
    trimmed and in lower case, its cells trimmed and spreadsheet quotes taken off; ImportFileError when the header
    names no email column."""
    delimiter = _delimiter(header)
    reader = csv.DictReader(itertools.chain([header], file), delimiter=delimiter)
    names = [(f or "").strip() for f in reader.fieldnames or []]
    fmt = recognise([n.lower() for n in names])
    if fmt is None:
        raise ImportFileError(
            f"{name}: no column of email addresses; expected one called {EXPECTED_EMAIL_COLUMNS}, "
            f"and the first line names {_shown(names)}"
        )
    layout = ImportLayout(fmt, delimiter, {n.lower(): n for n in names})

    def rows() -> Iterator[tuple[int, dict[str, str]]]:
        """Each row with the line it starts on (a quoted cell may hold line breaks)."""
        ended = reader.line_num
        for raw_row in reader:
            row = {
                (k or "").strip().lower(): from_spreadsheet((v or "").strip())
                for k, v in raw_row.items()
                if isinstance(v, str)
            }
            yield ended + 1, row
            ended = reader.line_num

    return layout, rows()


def _on_the_list(conn: Connection, keys: list[str]) -> set[str]:
    return set(conn.scalars(select(SUBSCRIBERS.c.email_key).where(db.one_of(SUBSCRIBERS.c.email_key, keys, conn))))


def _insert_chunk(nl: Newsletter, rows: list[dict[str, object]]) -> set[str]:
    """Insert the ROWS whose addresses are not on the list, in one short transaction; returns their email keys.

    Nobody on the list is changed. An address that someone else adds between the two statements (possible
    on PostgreSQL) is left as they added it, though counted here.
    """
    with nl.engine.begin() as conn:
        there = _on_the_list(conn, [str(row["email_key"]) for row in rows])
        new = [row for row in rows if row["email_key"] not in there]
        if new:  # many rows at once, without RETURNING: several times faster on PostgreSQL
            conn.execute(
                db.insert_for(conn)(SUBSCRIBERS).on_conflict_do_nothing(index_elements=[SUBSCRIBERS.c.email_key]), new
            )
        return {str(row["email_key"]) for row in new}


def _would_insert(nl: Newsletter, keys: list[str], report: ImportReport) -> set[str]:
    """The KEYS a real import would insert, for a dry run, which writes nothing."""
    with nl.engine.connect() as conn:
        there = _on_the_list(conn, keys) | report.seen
    new = {key for key in keys if key not in there}
    report.seen |= new
    return new


def _erased(nl: Newsletter, keys: list[str]) -> set[str]:
    """The email keys among KEYS whose readers asked to be erased."""
    hashes = {erased_key(nl, key): key for key in keys}
    with nl.engine.connect() as conn:
        found = conn.scalars(select(ERASED.c.key_hash).where(db.one_of(ERASED.c.key_hash, list(hashes), conn)))
        return {hashes[h] for h in found}


def _import_chunk(nl: Newsletter, chunk: list[tuple[int, dict[str, str]]], report: ImportReport) -> None:
    """Check the rows of CHUNK, insert the new addresses among them and count every row in REPORT."""
    now, listed_before = utcnow(), len(report.listed or [])
    layout = report.layout or ImportLayout(OUR_FORMAT)
    agent, labels = layout.user_agent, layout.labels()
    new: dict[str, tuple[int, dict[str, object]]] = {}
    for line, row in chunk:
        address = row.get(layout.format.email, "")
        try:
            values = _row_values(layout.format.convert(row), now, nl.config.digest.default_frequency, agent, labels)
        except _NeverConfirmed as exc:
            why = f"{address!r}: {exc} at {layout.format.source}, never confirmed: not imported"
            report.skip_never_confirmed(line, why)
            continue
        except ValueError as exc:
            report.skip(line, f"{address!r}: {exc}", refused=True)
            continue
        key = str(values["email_key"])
        if key in new:
            report.skip(line, f"{values['email']} is already a subscriber", refused=False)
        else:
            new[key] = (line, values)
    for key in _erased(nl, list(new)):
        line, values = new.pop(key)
        report.skip(line, f"{values['email']} was erased at the reader's request", refused=True)
    if not new:
        inserted: set[str] = set()
    elif report.dry_run:
        inserted = _would_insert(nl, list(new), report)
    else:
        inserted = _insert_chunk(nl, [values for _, values in new.values()])
    for key, (line, values) in new.items():
        if key in inserted:
            report.imported += 1
        else:
            report.skip(line, f"{values['email']} is already a subscriber", refused=False)
    if report.listed:
        report.listed[listed_before:] = sorted(report.listed[listed_before:])
    report.read += len(chunk)


def _import_rows(
    nl: Newsletter,
    rows: Iterator[tuple[int, dict[str, str]]],
    name: str,
    report: ImportReport,
    progress: ImportProgress,
    stop: threading.Event,
) -> None:
    with _file_errors(name):
        while not stop.is_set():
            chunk = list(itertools.islice(rows, IMPORT_CHUNK_ROWS))
            if not chunk:
                return
            _import_chunk(nl, chunk, report)
            progress(report)


def import_csv(
    nl: Newsletter,
    file: TextIO,
    listed: bool = False,
    progress: ImportProgress | None = None,
    dry_run: bool = False,
    recognised: Callable[[ImportLayout], None] | None = None,
) -> ImportReport:
    """Import FILE (CSV with an email column), committing IMPORT_CHUNK_ROWS rows at a time so that the sign-up
    form never waits long for the database. An address already on the list is left as it is. No email is sent.

    The file is this newsletter's export, or another service's (see `recognise`), separated by commas,
    semicolons or tabs; RECOGNISED is called with what it was recognised as before any row is read.
    LISTED keeps a line for every row not imported; PROGRESS is called before the first chunk and after
    each. DRY_RUN counts what would be imported and writes nothing. Ctrl-C or a stop signal ends the import
    after the chunk in hand is committed (report.stopped_by).
    Raises ImportFileError when the file is not UTF-8 CSV with a header naming an email column.
    """
    name = getattr(file, "name", "the file")
    with _file_errors(name):
        header = file.readline()
        start = file.tell() if file.seekable() else None
        layout, rows = _csv_rows(header, file, name)
        if recognised is not None:
            recognised(layout)
        count = None
        if start is not None:  # read through once to refuse a malformed file before anything is imported
            file.seek(start)
            count = sum(1 for _ in _csv_rows(header, file, name)[1])
            file.seek(start)
            layout, rows = _csv_rows(header, file, name)
    report = ImportReport(rows=count, listed=[] if listed else None, dry_run=dry_run, layout=layout)
    progress = progress or (lambda report: None)
    progress(report)
    failed: list[BaseException] = []
    stop = threading.Event()

    def work() -> None:
        try:
            _import_rows(nl, rows, name, report, progress, stop)
        except BaseException as exc:
            failed.append(exc)

    finished = threads.start(work, "import")
    try:
        finished.wait()
    except KeyboardInterrupt as interrupt:  # the chunk in hand is committed and counted
        stop.set()
        finished.wait()
        report.stopped_by = interrupt
    if failed:
        raise failed[0]
    return report
