"""A storage backend for the `limits` library (used by Flask-Limiter) in the app's own database.

Counters live in the `rate_limits` table, so every web process behind a load balancer shares them
without another server to run.
"""

from __future__ import annotations

import time

from limits.storage import Storage
from sqlalchemy import Engine, case, delete, select
from sqlalchemy.exc import SQLAlchemyError

from . import db
from .models import RateLimit

SCHEME = "newsletter-db"


class DatabaseStorage(Storage):
    STORAGE_SCHEME = [SCHEME]

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, engine: Engine | None = None,
                 **options: object) -> None:
        super().__init__(uri, wrap_exceptions)
        if engine is None:
            raise ValueError("DatabaseStorage needs the engine in storage_options")
        self.engine = engine

    @property
    def base_exceptions(self) -> type[Exception]:
        return SQLAlchemyError

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = time.time()
        fresh = RateLimit.expires_at <= now
        statement = db.insert_for(self.engine)(RateLimit).values(key=key, count=amount, expires_at=now + expiry)
        statement = statement.on_conflict_do_update(
            index_elements=[RateLimit.key],
            set_={"count": case((fresh, amount), else_=RateLimit.count + amount),
                  "expires_at": case((fresh, now + expiry), else_=RateLimit.expires_at)},
        ).returning(RateLimit.count)
        with self.engine.begin() as conn:
            return int(conn.execute(statement).scalar_one())

    def get(self, key: str) -> int:
        with self.engine.connect() as conn:
            count = conn.execute(select(RateLimit.count).where(RateLimit.key == key,
                                                               RateLimit.expires_at > time.time())).scalar()
        return int(count or 0)

    def get_expiry(self, key: str) -> float:
        with self.engine.connect() as conn:
            expires = conn.execute(select(RateLimit.expires_at).where(RateLimit.key == key)).scalar()
        return float(expires or time.time())

    def check(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(select(1))
            return True
        except SQLAlchemyError:
            return False

    def reset(self) -> int | None:
        with self.engine.begin() as conn:
            return conn.execute(delete(RateLimit)).rowcount

    def clear(self, key: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(RateLimit).where(RateLimit.key == key))


def purge_expired(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(delete(RateLimit).where(RateLimit.expires_at < time.time()))
