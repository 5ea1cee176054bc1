"""Worker threads the main thread waits for while Ctrl-C or SIGTERM may arrive.

Python 3.11's Thread.join, interrupted by KeyboardInterrupt, can mark a running thread as finished
(CPython gh-90882); a second join then returns while the thread is still sending. Waiting on an Event
the thread sets when its work is done has no such flaw.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


def start(target: Callable[[], None], name: str) -> threading.Event:
    """Run TARGET in a daemon thread; the Event returned is set once it has returned or raised."""
    finished = threading.Event()

    def run() -> None:
        try:
            target()
        finally:
            finished.set()

    threading.Thread(target=run, name=name, daemon=True).start()
    return finished


def wait(finished: list[threading.Event]) -> None:
    for event in finished:
        event.wait()
