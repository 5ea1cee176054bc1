"""The HTTP server: waitress in this process, or in several processes that share one listening socket.

CPython runs one thread of a process at a time, so a single process answers from one core, and its
request threads spend much of their time handing that core to each other. Several processes, each with
one request thread, use every core. The parent then only watches them: it forks the web processes (and
BACKGROUND, such as the outbox worker, in a process of its own), starts again any that dies, and stops
them all on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .threads import start as start_thread
from .threads import wait as wait_threads

log = logging.getLogger(__name__)

# waitress drops X-Forwarded-* headers itself by default; ProxyFix ([web] trusted_proxies) decides instead.
WAITRESS_OPTIONS = {"clear_untrusted_proxy_headers": False, "ident": "newsletter"}
CAN_FORK = hasattr(os, "fork")


def default_processes() -> int:
    """Two per core, at most 8: a request often waits for the database (SQLite's write lock, a round trip to
    PostgreSQL), and another process can use the core meanwhile."""
    return min(2 * (os.cpu_count() or 1), 8) if CAN_FORK else 1


def listen(host: str, port: int) -> socket.socket:
    """A listening socket for HOST:PORT (IPv4 or IPv6); raises OSError when it cannot be had."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    return socket.create_server((host, port), family=family, backlog=1024)


def serve(
    app: Callable,
    sock: socket.socket,
    processes: int,
    threads: int,
    background: Callable[[threading.Event], None] | None = None,
    after_fork: Callable[[], None] | None = None,
    error_headers: Sequence[tuple[str, str]] = (),
) -> None:
    """Serve APP on SOCK until interrupted, from PROCESSES forked processes or, with 1, from this one.

    BACKGROUND (such as the worker) runs beside the web, in a process or a thread of its own; it is given
    an event that is set when it should stop. ERROR_HEADERS go on the error responses waitress writes itself.
    """
    stop = threading.Event()
    if processes > 1:
        job = (lambda: background(stop)) if background is not None else None
        serve_forked(app, sock, processes, threads, background=job, after_fork=after_fork, error_headers=error_headers)
        return
    finished = [start_thread(lambda: background(stop), "worker")] if background is not None else []
    try:
        waitress_server(app, sock, threads, error_headers).run()
    finally:
        stop.set()
        wait_threads(finished)  # the worker records the batch it has on the wire


def waitress_server(
    app: Callable, sock: socket.socket, threads: int, error_headers: Sequence[tuple[str, str]] = ()
) -> Any:
    """A waitress server for APP on SOCK whose own error responses (a malformed request, say, which never
    reaches APP) carry ERROR_HEADERS."""
    from waitress.channel import HTTPChannel
    from waitress.server import create_server
    from waitress.task import ErrorTask

    class Task(ErrorTask):
        def execute(self) -> None:
            self.response_headers.extend(error_headers)
            super().execute()

    class Channel(HTTPChannel):
        error_task_class = Task

    server = create_server(app, sockets=[sock], threads=threads, **WAITRESS_OPTIONS)
    server.channel_class = Channel
    return server


def serve_forked(
    app: Callable,
    sock: socket.socket,
    processes: int,
    threads: int,
    background: Callable[[], None] | None = None,
    after_fork: Callable[[], None] | None = None,
    error_headers: Sequence[tuple[str, str]] = (),
) -> None:
    """Serve APP on SOCK from PROCESSES child processes until interrupted.

    AFTER_FORK runs first in every child (for example to drop inherited database connections). Fork
    before any thread starts: a child inherits only the forking thread, and locks held by others stay held.
    """

    def web() -> None:
        waitress_server(app, sock, threads, error_headers).run()

    jobs: dict[str, Callable[[], None]] = {f"web process {n}": web for n in range(1, processes + 1)}
    if background is not None:
        jobs["worker process"] = background
    children: dict[int, tuple[str, float]] = {}
    # The stop signals and SIGCHLD stay blocked and are taken with sigwait: a handler could run only between
    # two bytecodes, so a signal that came just before os.wait() would wait with it, lost.
    stop_signals = {signal.SIGTERM} | ({signal.SIGINT} if signal.getsignal(signal.SIGINT) != signal.SIG_IGN else set())
    watched = stop_signals | {signal.SIGCHLD}

    def start(name: str) -> None:
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the children
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                threading.Thread(target=_exit_with, args=(parent,), name="orphan-check", daemon=True).start()
                if after_fork:
                    after_fork()
                jobs[name]()
            except BaseException:
                log.exception("%s failed", name)
                status = 1
            finally:
                os._exit(status)
        children[pid] = (name, time.monotonic())

    parent = os.getpid()
    gc.freeze()  # what the parent built stays shared with the children, and their collector skips it
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    try:
        for name in jobs:
            start(name)
        while signal.sigwait(watched) not in stop_signals:
            for pid, status in _exited():
                name, started = children.pop(pid)
                log.warning(
                    "%s (pid %d) exited with status %d; starting another",
                    name,
                    pid,
                    os.waitstatus_to_exitcode(status),
                )
                if time.monotonic() - started < 1.0:
                    time.sleep(1.0)  # it is failing at start: do not spin
                start(name)
    finally:
        _stop_children(list(children))
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _exited() -> list[tuple[int, int]]:
    """The children that have ended since the last call, with their wait status."""
    ended: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return ended
        if pid == 0:
            return ended
        ended.append((pid, status))


def _exit_with(parent: int) -> None:
    """End this child when the parent is gone (killed with SIGKILL, it could not stop its children)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _stop_children(pids: list[int], grace: float = 5.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for pid in pids:
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.02)
