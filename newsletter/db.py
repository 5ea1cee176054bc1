"""Database engine, sessions and the Alembic migrations that build the schema."""

from __future__ import annotations

import threading
import time
import weakref
from contextlib import closing, nullcontext, suppress
from pathlib import Path
from typing import Callable

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, Executable, Insert, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine.interfaces import DBAPIConnection, DBAPICursor
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from .config import ConfigError
from .resources import resource_dir


class DatabaseError(Exception):
    """The database cannot be used as it is; the message is one line saying what to do."""


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
        raise ConfigError(f"[database] url {url!r} cannot be used: {exc}") from None


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
    dbapi_connection.isolation_level = None  # type: ignore[attr-defined]


class _WriterTurns:
    """SQLite has one writer at a time. Every transaction takes the write lock when it starts (BEGIN
    IMMEDIATE), so concurrent writers queue instead of failing; the threads of this process queue on a
    Python lock first, which hands over at once, where SQLite's own busy wait sleeps for milliseconds."""

    def __init__(self) -> None:
        self.lock = threading.RLock()

    def begin(self, conn: object) -> None:
        self.lock.acquire()
        try:
            conn.connection.dbapi_connection.execute("BEGIN IMMEDIATE")  # type: ignore[attr-defined]
        except BaseException:
            self.lock.release()
            raise

    def end(self, conn: object) -> None:
        self.lock.release()


_TURNS: weakref.WeakKeyDictionary[Engine, _WriterTurns] = weakref.WeakKeyDictionary()


BUSY_TIMEOUT = 30.0
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
        connection = getattr(self._local, "connection", None)
        if connection is None:
            pooled = self.engine.raw_connection()
            connection = pooled.driver_connection
            pooled.detach()  # this thread's own from now on
            if self.engine.dialect.name == "postgresql":
                connection.autocommit = True  # type: ignore[union-attr]
            if self._turns is not None:
                connection.execute("PRAGMA busy_timeout = 0")  # type: ignore[attr-defined]
            self._local.connection = connection
        return connection  # type: ignore[return-value]


def insert_for(conn: Connection | Engine) -> Callable[..., Insert]:
    """The INSERT of CONN's dialect, which has ON CONFLICT."""
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert


class DriverStatement:
    """A Core statement compiled once for an engine's dialect and run straight on a DBAPI cursor.

    For the few statements on the sign-up form's path, where SQLAlchemy's work for each execution costs
    more than the database's. Parameters go to the driver as they are: use plain str, int and float.
    """

    def __init__(self, engine: Engine, statement: Executable) -> None:
        compiled = statement.compile(dialect=engine.dialect)
        self.sql = compiled.string
        self.defaults = {name: bind.value for name, bind in compiled.binds.items()}  # the statement's literals
        self.names = compiled.positiontup if engine.dialect.positional else None

    def execute(self, cursor: DBAPICursor, **params: object) -> DBAPICursor:
        values = {**self.defaults, **params}
        cursor.execute(self.sql, tuple(values[name] for name in self.names) if self.names is not None else values)
        return cursor


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def _alembic_config(engine: Engine) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(resource_dir("migrations")))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()  # type: ignore[arg-type]


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot open the database {engine.url.render_as_string(hide_password=True)}: "
                            f"{_first_line(exc)}; check [database] url") from None


def upgrade(engine: Engine) -> tuple[str | None, str | None]:
    """Bring the database to the latest schema; returns (revision before, revision after)."""
    if engine.url.get_backend_name() == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
    before = current_revision(engine)
    command.upgrade(_alembic_config(engine), "head")
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
