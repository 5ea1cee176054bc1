"""[web] rate_limit: sign-ups per client address, counted in the sign-up log over sliding windows.

The `limits` library reads the limits ("10 per hour", "5/minute; 20/day"). The log is in the app's own
database, so every web process, on one machine or several, shares the count without another server.
"""

from __future__ import annotations

from limits import parse_many
from sqlalchemy import ColumnElement, Connection, Float, String, and_, bindparam, func, select

from .models import SIGNUPS


class SignupLimit:
    """A client may sign up when, for every limit, fewer than its amount of the client's sign-ups arrived
    within its window.

    The count and the new sign-up are one statement. SQLite runs one at a time, so the limit is exact; on
    PostgreSQL a client's requests that arrive at the same moment may each be counted without the others,
    so a burst can get at most one sign-up more per web process.
    """

    def __init__(self, spec: str) -> None:
        self.items = parse_many(spec)

    @property
    def longest(self) -> int:
        """Seconds the log must look back."""
        return max(item.get_expiry() for item in self.items)

    def admits(self) -> ColumnElement[bool]:
        """True when the client at bind parameter `ip` may sign up at `now`."""
        ip, now = bindparam("ip", type_=String()), bindparam("now", type_=Float())
        return and_(
            *(
                select(func.count())
                .where(SIGNUPS.c.ip == ip, SIGNUPS.c.received_at > now - item.get_expiry())
                .scalar_subquery()
                < item.amount
                for item in self.items
            )
        )

    def wait(self, conn: Connection, ip: str, now: float) -> float:
        """Seconds until the client at IP may sign up again."""
        wait = 0.0
        for item in self.items:
            window = item.get_expiry()
            recent = (
                select(SIGNUPS.c.received_at)
                .where(SIGNUPS.c.ip == ip, SIGNUPS.c.received_at > now - window)
                .order_by(SIGNUPS.c.received_at.desc())
                .limit(item.amount)
            )
            times = conn.scalars(recent).all()
            if len(times) >= item.amount:
                wait = max(wait, times[-1] + window - now)
        return wait
