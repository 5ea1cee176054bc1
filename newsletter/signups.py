"""The sign-up log. The form's handler only adds to it, with one statement that also applies [web]
rate_limit; the worker turns each new sign-up into a subscriber and a confirmation email
(subscriptions.subscribe)."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from sqlalchemy import Engine, Float, String, bindparam, delete, insert, select, update

from . import db
from .models import SIGNUPS
from .ratelimit import CEILING_WINDOW, SignupLimit, client_of, network_of
from .runtime import Newsletter
from .subscriptions import Enrolment, InvalidAddress, Requester, ceiling, normalize
from .text import clean_field

log = logging.getLogger(__name__)

SIGNUP_BATCH = 500


class SignupLog:
    """Adds the sign-ups the form accepts."""

    def __init__(self, engine: Engine, limit: SignupLimit) -> None:
        self.engine, self.limit = engine, limit
        self._writes = db.HotPath(engine)
        values = select(
            bindparam("email", type_=String()),
            bindparam("ip", type_=String()),
            bindparam("client", type_=String()),
            bindparam("network", type_=String()),
            bindparam("user_agent", type_=String()),
            bindparam("now", type_=Float()),
        )
        columns = ["email", "ip", "client", "network", "user_agent", "received_at"]
        self._add = db.DriverStatement(engine, insert(SIGNUPS).from_select(columns, values.where(limit.admits())))
        done = select(*values.selected_columns, bindparam("now", type_=Float())).where(limit.admits())
        self._note = db.DriverStatement(engine, insert(SIGNUPS).from_select([*columns, "processed_at"], done))

    def note_request(self, requester: Requester) -> float | None:
        """Count a request for a manage link against the client's [web] rate_limit, as a sign-up would be
        (the row is marked processed: the worker has nothing to do with it). Returns like add()."""
        return self._insert(self._note, "", requester)

    def add(self, address: str, requester: Requester) -> float | None:
        """Add a sign-up for an address that passed subscriptions.normalize, within [web] rate_limit.

        Returns None once the sign-up is committed; else, with nothing stored, the seconds until this
        client may sign up again.
        """
        return self._insert(self._add, address, requester)

    def _insert(self, statement: db.DriverStatement, address: str, requester: Requester) -> float | None:
        ip, now = clean_field(requester.ip, 64) or "", time.time()
        client, user_agent = client_of(ip), clean_field(requester.user_agent, 512)
        values = {"email": address, "ip": ip, "client": client, "network": network_of(ip), "user_agent": user_agent}
        if self._writes.execute(statement, now=now, **values):
            return None
        with self.engine.connect() as conn:
            return self.limit.wait(conn, client, now)


def process_signups(nl: Newsletter) -> int:
    """Record every new sign-up, oldest first, SIGNUP_BATCH to a transaction (subscriptions.Enrolment);
    returns how many.

    Several workers may run at once: on PostgreSQL each skips the sign-ups another has locked, and on
    SQLite transactions take turns.
    """
    claim = db.skip_locked(
        select(SIGNUPS).where(SIGNUPS.c.processed_at.is_(None)).order_by(SIGNUPS.c.id).limit(SIGNUP_BATCH), nl.engine
    )
    processed = update(SIGNUPS).where(SIGNUPS.c.id == bindparam("signup")).values(processed_at=bindparam("at"))
    done = 0
    while True:
        with nl.engine.begin() as conn:
            batch = conn.execute(claim).all()
            if not batch:
                return done
            valid = []
            for signup in batch:
                try:
                    valid.append((signup, normalize(signup.email)))
                except InvalidAddress as exc:
                    log.warning("sign-up %d dropped: %s", signup.id, exc)
            enrolment = Enrolment(conn, nl, [validated for _, validated in valid])
            origins = [(signup.network or network_of(signup.ip or ""), signup.received_at) for signup, _ in valid]
            held = ceiling(nl).holds_each(conn, origins)
            for (signup, validated), hold in zip(valid, held, strict=True):
                at = datetime.fromtimestamp(signup.received_at, UTC)
                enrolment.add(validated, Requester(signup.ip or None, signup.user_agent), at, hold)
            enrolment.finish()
            now = time.time()
            conn.execute(processed, [{"signup": signup.id, "at": now} for signup in batch])
        done += len(batch)


def forget_old(nl: Newsletter) -> None:
    """Delete processed sign-ups that neither [web] rate_limit nor the sign-up ceilings look back at."""
    keep = max(SignupLimit(nl.config.web.rate_limit).longest, CEILING_WINDOW)
    with nl.engine.begin() as conn:
        conn.execute(
            delete(SIGNUPS).where(SIGNUPS.c.processed_at.is_not(None), SIGNUPS.c.received_at < time.time() - keep)
        )
