"""Limits on the sign-up form, counted in the sign-up log over sliding windows.

[web] rate_limit is per client: an IPv4 address, or an IPv6 client's /64 (one household or host has a
whole /64). The `limits` library reads it ("10 per hour", "5/minute; 20/day"). [web] network_ceiling and
signup_ceiling decide when confirmation emails are held during a flood, per network: an IPv4 /24, an
IPv6 /48. The log is in the app's own database, so every web process, on one machine or several, shares
the counts without another server.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Sequence

from limits import parse_many
from sqlalchemy import ColumnElement, Connection, Float, String, and_, bindparam, case, func, select

from .models import SIGNUPS

CEILING_WINDOW = 3600.0


def client_of(ip: str) -> str:
    """What [web] rate_limit counts for IP: the IPv4 address, or the IPv6 /64 it is in."""
    return _prefix(ip, 32, 64)


def network_of(ip: str) -> str:
    """What [web] network_ceiling counts for IP: the IPv4 /24, or the IPv6 /48 it is in."""
    return _prefix(ip, 24, 48)


def _prefix(ip: str, v4_bits: int, v6_bits: int) -> str:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    bits = v4_bits if address.version == 4 else v6_bits
    network = ipaddress.ip_network(f"{address}/{bits}", strict=False)
    return str(network.network_address) if bits == network.max_prefixlen else str(network)


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
        """True when the client at bind parameter `client` may sign up at `now`."""
        client, now = bindparam("client", type_=String()), bindparam("now", type_=Float())
        return and_(
            *(
                select(func.count())
                .where(SIGNUPS.c.client == client, SIGNUPS.c.received_at > now - item.get_expiry())
                .scalar_subquery()
                < item.amount
                for item in self.items
            )
        )

    def wait(self, conn: Connection, client: str, now: float) -> float:
        """Seconds until CLIENT may sign up again."""
        wait = 0.0
        for item in self.items:
            window = item.get_expiry()
            recent = (
                select(SIGNUPS.c.received_at)
                .where(SIGNUPS.c.client == client, SIGNUPS.c.received_at > now - window)
                .order_by(SIGNUPS.c.received_at.desc())
                .limit(item.amount)
            )
            times = conn.scalars(recent).all()
            if len(times) >= item.amount:
                wait = max(wait, times[-1] + window - now)
        return wait


class SignupCeiling:
    """When to hold confirmation emails: a sign-up's email is held when its network sent more than
    `per_network` sign-ups in the hour up to it, or when that hour's sign-ups, counting at most `per_network`
    from any one network, are more than `total`. A flood from a few networks holds only their own emails."""

    def __init__(self, total: int, per_network: int) -> None:
        self.total, self.per_network = total, per_network

    def holds(self, conn: Connection, network: str, at: float) -> bool:
        """Whether a sign-up from NETWORK received AT (already in the log, AT to the microsecond) gets its
        email held."""
        in_hour = and_(SIGNUPS.c.received_at > at - CEILING_WINDOW, SIGNUPS.c.received_at <= at + 1e-6)
        from_network = select(SIGNUPS.c.id).where(in_hour, SIGNUPS.c.network == network).limit(self.per_network + 1)
        if (conn.scalar(select(func.count()).select_from(from_network.subquery())) or 0) > self.per_network:
            return True
        return self._counted(conn, in_hour) > self.total

    def holds_each(self, conn: Connection, signups: Sequence[tuple[str, float]]) -> list[bool]:
        """holds() for each (network, received at) of SIGNUPS, in a few queries for them all.

        A sign-up's hour contains the hour that ends at the first of them and starts an hour before the last,
        and lies within the hour before the first up to the last: when counting the first window already
        holds an email, or the second cannot, that is the answer; only sign-ups in between are counted alone.
        """
        if not signups:
            return []
        first, last = min(at for _, at in signups), max(at for _, at in signups)
        networks = {network for network, _ in signups}
        surely = self._over(conn, networks, last - CEILING_WINDOW, first)
        held = [surely(network) for network, _ in signups]
        if all(held):
            return held
        maybe = self._over(conn, networks, first - CEILING_WINDOW, last)
        return [
            hold or (maybe(network) and self.holds(conn, network, at))
            for hold, (network, at) in zip(held, signups, strict=True)
        ]

    def _over(self, conn: Connection, networks: Collection[str], start: float, end: float) -> Callable[[str], bool]:
        """Whether a sign-up from a network of NETWORKS would be held, counting the sign-ups received after
        START up to END."""
        in_window = and_(SIGNUPS.c.received_at > start, SIGNUPS.c.received_at <= end + 1e-6)
        counts: dict[str, int] = dict(
            conn.execute(
                select(SIGNUPS.c.network, func.count())
                .where(in_window, SIGNUPS.c.network.in_(networks))
                .group_by(SIGNUPS.c.network)
            ).all()
        )
        flooded = self._counted(conn, in_window) > self.total
        return lambda network: flooded or counts.get(network, 0) > self.per_network

    def flooded(self, conn: Connection, now: float) -> bool:
        """Whether some network, or the whole form, is over its ceiling in the hour up to NOW."""
        in_hour = SIGNUPS.c.received_at > now - CEILING_WINDOW
        busiest = select(func.count()).where(in_hour).group_by(SIGNUPS.c.network).order_by(func.count().desc())
        return (conn.scalar(busiest.limit(1)) or 0) > self.per_network or self._counted(conn, in_hour) > self.total

    def recent(self, conn: Connection, now: float) -> int:
        """Sign-ups in the hour up to NOW."""
        return conn.scalar(select(func.count()).where(SIGNUPS.c.received_at > now - CEILING_WINDOW)) or 0

    def _counted(self, conn: Connection, in_hour: ColumnElement[bool]) -> int:
        per_network = select(func.count().label("n")).where(in_hour).group_by(SIGNUPS.c.network).subquery()
        capped = case((per_network.c.n > self.per_network, self.per_network), else_=per_network.c.n)
        return conn.scalar(select(func.coalesce(func.sum(capped), 0))) or 0
