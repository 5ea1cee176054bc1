"""Copy a whole installation to another database (SQLite to PostgreSQL, say): readers with their consent
records, posts, and the send ledger, so that nothing is sent twice after the move."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from sqlalchemy import Connection, Engine, Integer, Table, func, select, text
from sqlalchemy.exc import SQLAlchemyError

from . import db
from .models import Base
from .text import hide_password

CHUNK_ROWS = 5000


class CopyFailed(Exception):
    """The target database refused the rows or went away; its transaction is rolled back."""


class TargetNotEmpty(Exception):
    """The target database already holds rows; copying into it could mix two lists."""


def copy_database(source: Engine, target: Engine, progress: Callable[[str, int], None] | None = None) -> dict[str, int]:
    """Bring TARGET to the latest schema, then copy every table of SOURCE into it (SOURCE must be at the
    latest schema too); returns the rows copied per table. Raises TargetNotEmpty when TARGET holds rows."""
    db.require_current_schema(source)
    db.upgrade(target)
    tables = Base.metadata.sorted_tables  # parents before the rows that point at them
    with target.connect() as conn:
        full = [t.name for t in tables if conn.scalar(select(func.count()).select_from(t))]
    if full:
        raise TargetNotEmpty(", ".join(full))
    try:
        return _copy(source, target, tables, progress)
    except SQLAlchemyError as exc:
        raise CopyFailed(hide_password(" ".join(str(getattr(exc, "orig", None) or exc).split())[:300])) from None


def _copy(
    source: Engine, target: Engine, tables: list[Table], progress: Callable[[str, int], None] | None
) -> dict[str, int]:
    copied: dict[str, int] = {}
    with source.connect() as reading, target.begin() as writing:
        for table in tables:
            rows = reading.execution_options(yield_per=CHUNK_ROWS).execute(select(table))
            copied[table.name] = 0
            while chunk := [row._asdict() for row in itertools.islice(rows, CHUNK_ROWS)]:
                writing.execute(table.insert(), chunk)
                copied[table.name] += len(chunk)
                if progress:
                    progress(table.name, copied[table.name])
        if target.dialect.name == "postgresql":
            _continue_sequences(writing)
    return copied


def _continue_sequences(conn: Connection) -> None:
    """Set each serial id's sequence past the rows copied, so that new rows get new ids."""
    for table in Base.metadata.sorted_tables:
        [*key] = table.primary_key.columns
        if len(key) != 1 or not isinstance(key[0].type, Integer):
            continue
        sequence = conn.scalar(text("SELECT pg_get_serial_sequence(:t, :c)"), {"t": table.name, "c": key[0].name})
        if sequence:
            highest = conn.scalar(select(func.max(key[0])))
            conn.execute(text("SELECT setval(:s, :v, false)"), {"s": sequence, "v": (highest or 0) + 1})
