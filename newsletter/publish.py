"""Sending on publish without cron: the worker fetches the feed and sends as `newsletter send` does, every
[schedule] poll_minutes and soon after a signed publish ping.

The web handler only records a ping, in a small file beside the SQLite database (or, on PostgreSQL, in the
system's temporary folder), which the worker takes on its next loop; the same file keeps the signatures
seen in the last minutes, so a ping replayed is refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from . import db, dispatch
from .dispatch import SendReport
from .feeds import FeedError
from .posts import fetch_feed
from .runtime import Newsletter

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Newsletter-Signature"
TOLERANCE = 300


class BadSignature(Exception):
    """The ping is not signed with [schedule] webhook_secret, is stale, or was seen before."""


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header's value for BODY sent at TIMESTAMP (unix seconds)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, now: float) -> str:
    """The signature of a ping whose HEADER signs BODY with SECRET within TOLERANCE seconds of NOW."""
    fields = dict(part.strip().partition("=")[::2] for part in header.split(","))
    try:
        timestamp = int(fields.get("t", ""))
    except ValueError:
        raise BadSignature(f"{SIGNATURE_HEADER} must read t=<unix time>,v1=<hex HMAC-SHA256>") from None
    given = fields.get("v1", "")
    expected = sign(secret, body, timestamp).rpartition("v1=")[2]
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise BadSignature("the signature does not match [schedule] webhook_secret")
    if abs(now - timestamp) > TOLERANCE:
        raise BadSignature(f"the timestamp is more than {TOLERANCE} seconds away from this server's clock")
    return expected


def state_file(nl: Newsletter, suffix: str) -> Path:
    """A file of this installation: beside an SQLite database, else in the temporary folder."""
    url = nl.engine.url
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return Path(f"{url.database}{suffix}")
    key = hashlib.sha256(url.render_as_string(hide_password=False).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"newsletter-{os.getuid()}-{key}{suffix}"


def record_ping(nl: Newsletter, header: str, body: bytes, now: float | None = None) -> None:
    """Accept a signed ping for the worker; raises BadSignature (nothing recorded) when it is not valid."""
    now = time.time() if now is None else now
    signature = verify(nl.config.schedule.webhook_secret, header, body, now)
    with open(state_file(nl, ".publish-seen"), "a+", encoding="ascii") as seen:
        fcntl.flock(seen, fcntl.LOCK_EX)
        seen.seek(0)
        lines = [line.split(" ") for line in seen.read().splitlines() if line.count(" ") == 1]
        recent = [(at, sig) for at, sig in lines if _number(at) > now - 2 * TOLERANCE]
        if any(sig == signature for _, sig in recent):
            raise BadSignature("this ping was seen before")
        seen.seek(0)
        seen.truncate()
        seen.writelines(f"{at} {sig}\n" for at, sig in [*recent, (f"{now:.0f}", signature)])
    state_file(nl, ".publish-ping").touch()


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def take_ping(nl: Newsletter) -> bool:
    """Whether a ping arrived since the last call."""
    try:
        state_file(nl, ".publish-ping").unlink()
    except FileNotFoundError:
        return False
    return True


def fetch_and_send(nl: Newsletter, stop: threading.Event | None = None) -> SendReport | None:
    """Fetch the feed and send what is due, as `newsletter send` does (STOP: see dispatch.send); None when
    another sender holds the SQLite database. Raises FeedError."""
    try:
        with db.sender_lock(nl.engine) as sender_id:
            fetch_feed(nl)
            return dispatch.send(nl, sender_id, stop=stop)
    except db.SenderBusy:
        return None


class Schedule:
    """When the worker fetches and sends: every [schedule] poll_minutes (0: never) and after each ping."""

    def __init__(self, nl: Newsletter, clock: Callable[[], float] = time.monotonic) -> None:
        self.nl, self.clock = nl, clock
        self.every = nl.config.schedule.poll_minutes * 60.0
        self.next_poll = clock()

    def due(self) -> str | None:
        """Why to fetch and send now ("publish ping", "poll"), or None."""
        pinged = bool(self.nl.config.schedule.webhook_secret) and take_ping(self.nl)
        polled = bool(self.every) and self.clock() >= self.next_poll
        if polled:
            self.next_poll = self.clock() + self.every
        return "publish ping" if pinged else "poll" if polled else None


def run_due(nl: Newsletter, schedule: Schedule, stop: threading.Event | None = None) -> SendReport | None:
    """Fetch and send if SCHEDULE says so, logging what came of it; a feed error is logged, not raised."""
    reason = schedule.due()
    if reason is None:
        return None
    try:
        report = fetch_and_send(nl, stop)
    except FeedError as exc:
        log.warning("%s: %s; nothing was sent", reason, exc)
        return None
    if report is None:
        log.info("%s: another `newsletter send` is running; skipped this round", reason)
        if reason == "publish ping":
            state_file(nl, ".publish-ping").touch()  # try again on the next loop
    elif report.posts or report.digests or report.resent or report.error:
        log.info("%s: %s", reason, report.summary())
    return report
