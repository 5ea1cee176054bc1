"""The background worker: records queued sign-ups, then delivers the outbox, until stopped."""

from __future__ import annotations

import logging
import threading

from .mailer import MailerError
from .outbox import OutboxReport, deliver_outbox
from .runtime import Newsletter
from .signups import forget_old, process_signups
from .subscriptions import release_held

log = logging.getLogger(__name__)


def work_once(nl: Newsletter) -> tuple[int, OutboxReport]:
    """Record the queued sign-ups and send what is due; returns (sign-ups recorded, outbox report).

    Raises MailerError when the SMTP server cannot be used.
    """
    recorded = process_signups(nl)
    forget_old(nl)
    release_held(nl)
    return recorded, deliver_outbox(nl)


def run_worker(nl: Newsletter, stop: threading.Event, interval: float = 2.0) -> None:
    """Work until STOP is set, backing off while the SMTP server is unreachable."""
    wait = interval
    while not stop.is_set():
        try:
            recorded, report = work_once(nl)
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
        except Exception:
            log.exception("worker: failed; retrying in %.0f s", wait)
            wait = min(wait * 2, 60.0)
        stop.wait(wait)
