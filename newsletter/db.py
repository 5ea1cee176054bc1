"""Database engine, sessions and the Alembic migrations that build the schema.

Every difference between SQLite and PostgreSQL that the rest of the code relies on is here: how writers
take turns or claim rows side by side, and how a sender tells a live sender from a dead one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import secrets
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, nullcontext, suppress
from pathlib import Path
from typing import Any, TypeVarTuple, cast

from sqlalchemy import (
    ClauseElement,
    ColumnElement,
    Connection,
    Engine,
    Row,
    Select,
    String,
    Table,
    Text,
    any_,
    bindparam,
    create_engine,
    event,
    func,
    inspect,
    literal,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.engine.interfaces import DBAPIConnection, DBAPICursor
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Update

from .config import ConfigError
from .resources import resource_dir
from .text import hide_password

Ts = TypeVarTuple("Ts")


class DatabaseError(Exception):
    """The database cannot be used as it is; the message is one line saying what to do."""


class SenderBusy(Exception):
    """Another sender holds the lock on this (SQLite) database."""


def make_engine(url: str) -> Engine:
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
            turns = _TURNS[engine] = _WriterTurns()
            event.listen(engine, "begin", turns.begin)
            event.listen(engine, "commit", turns.end)
            event.listen(engine, "rollback", turns.end)
            return engine
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
    except (ArgumentError, ImportError) as exc:
        raise ConfigError(hide_password(f"[database] url {url!r} cannot be used: {_first_line(exc)}")) from None


def _sqlite_pragmas(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
    dbapi_connection.isolation_level = None


class _WriterTurns:
    """SQLite has one writer at a time. Every transaction takes the write lock when it starts (BEGIN
    IMMEDIATE), so concurrent writers queue instead of failing; the threads of this process queue on a
    Python lock first, which hands over at once, where SQLite's own busy wait sleeps for milliseconds."""

    def __init__(self) -> None:
        self.lock = threading.RLock()

    def begin(self, conn: Connection) -> None:
        self.lock.acquire()
        try:
            cast(sqlite3.Connection, conn.connection.dbapi_connection).execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise

    def end(self, conn: object) -> None:
        self.lock.release()


_TURNS: weakref.WeakKeyDictionary[Engine, _WriterTurns] = weakref.WeakKeyDictionary()


BUSY_TIMEOUT = 30.0
VERSION_TABLE = "alembic_version"  # where Alembic records the schema's revision
SQLITE_BUSY = 5


class HotPath:
    """Runs single-statement writes, each its own transaction, on a DBAPI connection that each thread keeps.

    For the sign-up form: taking a connection from the pool for every request (and, on PostgreSQL, checking
    it with a round trip first) would cost more than the statement. A connection the server dropped is
    replaced once. On SQLite a write first waits for this process's other writers, as transactions do,
    then for other processes' in steps of at most 2 ms (SQLite's own wait sleeps a millisecond or more
    from the start), for up to BUSY_TIMEOUT seconds.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._turns = _TURNS.get(engine)
        self._local = threading.local()

    def execute(self, statement: DriverStatement, **params: object) -> int:
        """Run STATEMENT; returns the number of rows it changed."""
        try:
            return self._run(statement, params)
        except self.engine.dialect.loaded_dbapi.Error as exc:
            connection = getattr(self._local, "connection", None)
            if connection is None or not self.engine.dialect.is_disconnect(exc, connection, None):
                raise
            self._local.connection = None
            with suppress(Exception):
                connection.close()
        return self._run(statement, params)

    def _run(self, statement: DriverStatement, params: dict[str, object]) -> int:
        turn = self._turns.lock if self._turns is not None else nullcontext()
        pause, deadline = 0.0001, time.monotonic() + BUSY_TIMEOUT
        while True:
            try:
                with turn, closing(self._connection().cursor()) as cursor:
                    return statement.execute(cursor, **params).rowcount
            except self.engine.dialect.loaded_dbapi.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", None) != SQLITE_BUSY or time.monotonic() > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.002)

    def _connection(self) -> DBAPIConnection:
        connection: Any = getattr(self._local, "connection", None)  # the driver's own: sqlite3's or psycopg's
        if connection is None:
            pooled = self.engine.raw_connection()
            connection = pooled.driver_connection
            pooled.detach()  # this thread's own from now on
            if self.engine.dialect.name == "postgresql":
                connection.autocommit = True
            if self._turns is not None:
                connection.execute("PRAGMA busy_timeout = 0")
            self._local.connection = connection
        return connection


def insert_for(conn: Connection | Engine) -> Callable[..., postgresql.Insert | sqlite.Insert]:
    """The INSERT of CONN's dialect, which has ON CONFLICT."""
    return postgresql.insert if _postgresql(conn) else sqlite.insert


class DriverStatement:
    """A Core statement compiled once for an engine's dialect and run straight on a DBAPI cursor.

    For statements on hot paths (the sign-up form, every batch of a send), where SQLAlchemy's work for each
    execution costs more than the database's. Parameters are converted as their types say (a datetime as
    the column stores it); an id list made by ids_in takes the value of ids_value.
    """

    def __init__(self, engine: Engine, statement: ClauseElement) -> None:
        # a statement (not DDL) compiles with the dialect's statement compiler, an SQLCompiler
        compiled = cast(SQLCompiler, statement.compile(dialect=engine.dialect))
        self.sql = compiled.string
        self.defaults = {name: bind.value for name, bind in compiled.binds.items()}  # the statement's literals
        self.names = compiled.positiontup if engine.dialect.positional else None
        self.processors = {
            name: processor
            for name, bind in compiled.binds.items()
            if (processor := bind.type.bind_processor(engine.dialect)) is not None
        }

    def execute(self, cursor: DBAPICursor, **params: object) -> DBAPICursor:
        values = {**self.defaults, **params}
        for name, processor in self.processors.items():
            values[name] = processor(values[name])
        cursor.execute(self.sql, tuple(values[name] for name in self.names) if self.names is not None else values)
        return cursor


def ids_in(column: ColumnElement[int], name: str, bind: Connection | Engine) -> ColumnElement[bool]:
    """COLUMN is one of the ids in parameter NAME, a single text parameter however many ids (see ids_value):
    an array literal cast on PostgreSQL, a JSON array read by json_each on SQLite."""
    ids = bindparam(name, type_=String())
    if _postgresql(bind):
        return column == any_(ids.cast(postgresql.ARRAY(column.type)))
    return column.in_(select(literal_column("value")).select_from(func.json_each(ids)))


def ids_value(ids: Sequence[int], bind: Connection | Engine) -> str:
    """IDS as the parameter of ids_in. (Text, not a list: the driver inspects each int of a list to pick the
    array's type, which took 130 µs of CPU a statement of 100 ids against 75 µs for the text.)"""
    if _postgresql(bind):
        return "{" + ",".join(map(str, ids)) + "}"
    return json.dumps(ids)


def joined_in_order(column: ColumnElement[int], bind: Connection | Engine) -> ColumnElement[str]:
    """The group's values of COLUMN joined by commas, smallest first. SQLite joins them in the order the rows
    come, so select them from a subquery ordered by COLUMN within each group."""
    if _postgresql(bind):
        return func.string_agg(column.cast(Text), aggregate_order_by(literal(","), column))
    return func.group_concat(column, ",")


class CompiledClaim:
    """claim() compiled once: run() sets VALUES (given to run) on the rows whose ids DUE selects and returns
    COLUMNS of each, in id order, on the DBAPI cursor of a connection in a transaction."""

    def __init__(
        self,
        engine: Engine,
        table: Table,
        due: Select[int],
        keys: Sequence[str],
        columns: Sequence[ColumnElement[Any]],
        *where: ColumnElement[bool],
    ) -> None:
        self.postgresql = _postgresql(engine)
        values = {key: bindparam(f"set_{key}", type_=table.c[key].type) for key in keys}
        claiming, marking = _claim_statements(engine, table, due, values, columns, *where)
        self.claim = DriverStatement(engine, claiming)
        self.mark = DriverStatement(engine, marking) if marking is not None else None

    def run(self, cursor: DBAPICursor, values: dict[str, Any], **params: object) -> list[tuple[Any, ...]]:
        fill = {f"set_{key}": value for key, value in values.items()}
        if self.postgresql:
            return sorted(self.claim.execute(cursor, **params, **fill).fetchall())  # RETURNING keeps no order
        rows = list(self.claim.execute(cursor, **params).fetchall())
        if rows and self.mark is not None:
            self.mark.execute(cursor, ids=json.dumps([row[0] for row in rows]), **fill)
        return rows


def _postgresql(bind: Connection | Engine) -> bool:
    return bind.dialect.name == "postgresql"


def one_of(column: ColumnElement[str], values: Sequence[str], bind: Connection | Engine) -> ColumnElement[bool]:
    """COLUMN IN VALUES, for many values. On PostgreSQL one array parameter: with a list of parameters, the plan
    that the driver's prepared statement comes to use compares every row with every value."""
    if _postgresql(bind):
        return column == any_(bindparam(None, list(values), type_=postgresql.ARRAY(column.type)))
    return column.in_(values)


def skip_locked(query: Select[*Ts], bind: Connection | Engine) -> Select[*Ts]:
    """QUERY locking what it selects and passing over rows another transaction holds, on PostgreSQL.

    SQLite's writers take turns (every transaction starts with BEGIN IMMEDIATE), so there it needs neither.
    """
    return query.with_for_update(skip_locked=True) if _postgresql(bind) else query


def locked(query: Select[*Ts], bind: Connection | Engine) -> Select[*Ts]:
    """QUERY locking what it selects until the transaction ends, on PostgreSQL (SQLite: see skip_locked)."""
    return query.with_for_update() if _postgresql(bind) else query


def claim(
    conn: Connection,
    table: Table,
    due: Select[int],
    values: dict[str, Any],
    columns: Sequence[ColumnElement[Any]],
    *where: ColumnElement[bool],
) -> list[Row[*tuple[Any, ...]]]:
    """Set VALUES on the rows of TABLE whose ids DUE selects and return COLUMNS of each, in id order.

    COLUMNS start with TABLE's id and may name another table joined by WHERE; they are read as the rows
    were before VALUES, so VALUES should not change them. On PostgreSQL this is one UPDATE ... RETURNING
    over the rows no other sender has locked (SKIP LOCKED), so senders claim side by side; SQLite's
    RETURNING sees only the updated table, and its writers take turns, so there it is a SELECT and then
    an UPDATE of what it found.
    """
    claiming, marking = _claim_statements(conn, table, due, values, columns, *where)
    if marking is None:
        return sorted(conn.execute(claiming))
    rows = list(conn.execute(claiming))
    if rows:
        conn.execute(marking, {"ids": ids_value([row[0] for row in rows], conn)})
    return rows


def _claim_statements(
    bind: Connection | Engine,
    table: Table,
    due: Select[int],
    values: Mapping[str, Any],
    columns: Sequence[ColumnElement[Any]],
    *where: ColumnElement[bool],
) -> tuple[Select[Any] | Update, Update | None]:
    """What claim() runs: on PostgreSQL one UPDATE ... RETURNING (no second statement); on SQLite the SELECT,
    then the UPDATE of the ids it found (parameter ids, see ids_value)."""
    ids = table.c.id.in_(skip_locked(due, bind).scalar_subquery())
    if _postgresql(bind):
        return update(table).values(values).where(ids, *where).returning(*columns), None
    found = select(*columns).where(ids, *where).order_by(table.c.id)
    return found, update(table).values(values).where(ids_in(table.c.id, "ids", bind))


def advisory_xact_lock(conn: Connection, *keys: str) -> None:
    """Hold each of KEYS until the transaction ends, so transactions about the same thing take turns
    (PostgreSQL; SQLite's transactions all take turns already). The locks are taken in one order, so two
    transactions that each want several never wait for each other in a circle."""
    if _postgresql(conn) and keys:
        conn.execute(
            text(
                "SELECT pg_advisory_xact_lock(h) FROM"
                " (SELECT DISTINCT hashtext(k) AS h FROM unnest(CAST(:keys AS text[])) AS k ORDER BY h) AS held"
            ),
            {"keys": list(keys)},
        )


def refresh_statistics(engine: Engine, table: str) -> None:
    """Fresh planner statistics for TABLE after a bulk insert, or PostgreSQL may plan a scan of every row."""
    if _postgresql(engine):
        with engine.connect() as conn:
            conn.execute(text(f"ANALYZE {table}"))
            conn.commit()


@contextlib.contextmanager
def sender_lock(engine: Engine) -> Iterator[int]:
    """Register this process as a sender and yield its id.

    SQLite allows one sender at a time (a file lock; SenderBusy when another holds it). PostgreSQL allows
    many: each holds an advisory lock named by its id for as long as it lives, so the rows a dead sender
    left behind can be told apart (sender_alive). Both locks die with their process, so a crashed run
    never blocks the next.
    """
    sender_id = secrets.randbits(62)
    if _postgresql(engine):
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": sender_id})
            conn.commit()
            try:
                yield sender_id
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": sender_id})
                conn.commit()
        return
    path = engine.url.database
    if not path or path == ":memory:":
        yield sender_id
        return
    with open(f"{path}.send-lock", "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SenderBusy("another `newsletter send` is running on this database; wait for it to finish") from None
        try:
            yield sender_id
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sender_alive(engine: Engine, sender_id: int) -> bool:
    """Whether the sender SENDER_ID still holds its sender_lock (on SQLite only the caller can)."""
    if not _postgresql(engine):
        return False
    with engine.connect() as conn:
        free = conn.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": sender_id}).scalar()
        if free:
            conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": sender_id})
        conn.commit()
        return not free


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def head_revision() -> str:
    """The latest migration's revision, read from its file name (`NNNN_what.py` holds revision "NNNN"), so
    that commands which only check the schema need not load Alembic."""
    return max(path.name.split("_", 1)[0] for path in (resource_dir("migrations") / "versions").glob("[0-9]*_*.py"))


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table(VERSION_TABLE):
                return None
            return conn.scalar(text(f"SELECT version_num FROM {VERSION_TABLE}"))
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"cannot open the database {engine.url.render_as_string(hide_password=True)}: "
            f"{hide_password(_first_line(exc))}; check [database] url"
        ) from None


def upgrade(engine: Engine) -> tuple[str | None, str | None]:
    """Bring the database to the latest schema; returns (revision before, revision after)."""
    if engine.url.get_backend_name() == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
    from alembic import command
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(resource_dir("migrations")))
    cfg.attributes["engine"] = engine
    before = current_revision(engine)
    command.upgrade(cfg, "head")
    return before, current_revision(engine)


def require_current_schema(engine: Engine) -> None:
    current, head = current_revision(engine), head_revision()
    if current != head:
        state = "is empty" if current is None else f"is at revision {current}, the latest is {head}"
        raise DatabaseError(f"the database {state}: run `newsletter db upgrade` first")


def ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def _first_line(exc: BaseException) -> str:
    message = str(getattr(exc, "orig", None) or exc)
    return message.strip().splitlines()[0] if message.strip() else type(exc).__name__
