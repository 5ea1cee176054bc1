"""The background worker: records queued sign-ups, then delivers the outbox, until stopped."""

from __future__ import annotations

import logging
import signal
import threading
import time

from .mailer import MailerError
from .outbox import OutboxReport, deliver_outbox
from .publish import Schedule, run_due
from .runtime import Newsletter
from .signups import forget_old, process_signups
from .subscriptions import forget_unconfirmed, release_held

log = logging.getLogger(__name__)


TIDY_EVERY = 3600.0


def work_once(nl: Newsletter, tidy: bool = True, stop: threading.Event | None = None) -> tuple[int, OutboxReport]:
    """Record the queued sign-ups and send what is due; returns (sign-ups recorded, outbox report).

    With TIDY, first forget the sign-ups [web] unconfirmed_days allows no longer. Raises MailerError when
    the SMTP server cannot be used. STOP set ends the sending after the batch on the wire (deliver_outbox).
    """
    if tidy:
        forget_unconfirmed(nl)
    recorded = process_signups(nl)
    forget_old(nl)
    release_held(nl)
    return recorded, deliver_outbox(nl, stop)


def run_worker(nl: Newsletter, stop: threading.Event, interval: float = 2.0) -> None:
    """Work until STOP is set, backing off while the SMTP server is unreachable.

    Fetches the feed and sends as `newsletter send` does when [schedule] says so (publish.Schedule). A stop
    signal during such a send lets its batches finish, then the worker returns.
    """
    _stop_on_sigterm()
    try:
        _work_until(nl, stop, interval)
    except KeyboardInterrupt:
        pass


def _work_until(nl: Newsletter, stop: threading.Event, interval: float) -> None:
    wait, next_tidy, schedule = interval, 0.0, Schedule(nl)
    while not stop.is_set():
        try:
            sent = run_due(nl, schedule, stop)
            if sent is not None and sent.stopped_by is not None:
                return
            tidy = time.monotonic() >= next_tidy
            recorded, report = work_once(nl, tidy, stop)
            if tidy:
                next_tidy = time.monotonic() + TIDY_EVERY
            if recorded or report.sent or report.failed or report.deferred:
                log.info(
                    "%d sign-ups recorded; outbox: %d sent, %d deferred, %d failed",
                    recorded,
                    report.sent,
                    report.deferred,
                    report.failed,
                )
            wait = interval
        except MailerError as exc:
            log.warning("outbox: SMTP server unavailable (%s); retrying in %.0f s", exc, wait)
            wait = min(wait * 2, 60.0)
        except Exception as exc:
            if _from_stop_signal(exc):
                raise KeyboardInterrupt from None
            log.exception("worker: failed; retrying in %.0f s", wait)
            wait = min(wait * 2, 60.0)
        stop.wait(wait)


def _from_stop_signal(exc: BaseException) -> bool:
    """Whether EXC is a library's error about a stop signal it was interrupted by: psycopg, stopped in the
    middle of a statement by the KeyboardInterrupt, can raise its own error while SQLAlchemy cleans up."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _stop_on_sigterm() -> None:
    """SIGTERM stops the worker as Ctrl-C does, where nothing else handles it (a forked worker process)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt
