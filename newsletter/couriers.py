"""Couriers turn a batch of a send's emails into messages and hand them to the mail server.

The sender's threads claim and record rows (dispatch.py); each thread gives its batches to a courier of
its own, which owns one SMTP connection. In-process couriers render and write in that thread. Forked
couriers do both in child processes, so that the connections render and write on every CPU core instead
of taking turns at one interpreter lock. A child never touches the database: it gets each batch with the
templates it has not seen yet and answers with one Result per email.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import threading
from collections.abc import Hashable, Mapping, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import NamedTuple, Protocol

from .mailer import Envelope, Outcome, Result, Transport
from .messages import MessageTemplate
from .runtime import Newsletter

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class Letter(NamedTuple):
    """One list email: a ledger row of KIND ("d" deliveries, "g" digests), its reader, its Message-ID and
    the key of the template it is made from. (A tuple: a batch goes to a child as plain tuples, which cost
    a fraction of objects to pickle.)"""

    kind: str
    row_id: int
    subscriber_id: int
    recipient: str
    message_id: str
    template: Hashable


Templates = Mapping[Hashable, MessageTemplate]


class CourierLost(Exception):
    """A child process ended during a batch: whether its emails went out is unknown."""


class Courier(Protocol):
    def send(self, letters: Sequence[Letter], templates: Templates) -> list[Result]:
        """One Result per letter, in order; raises MailerError as Transport.send does."""
        ...


def envelope(nl: Newsletter, letter: Letter, template: MessageTemplate) -> Envelope:
    """LETTER's email with its reader's links and its own envelope sender."""
    reader, kind, row = letter.subscriber_id, letter.kind, letter.row_id
    message = template.render(
        letter.recipient,
        letter.message_id,
        nl.unsubscribe_url(reader),
        nl.manage_url(reader),
        nl.mailto_unsubscribe(kind, row),
    )
    return Envelope(nl.return_path(kind, row), letter.recipient, message, wire_ready=True)


def _send(nl: Newsletter, transport: Transport, letters: Sequence[Letter], templates: Templates) -> list[Result]:
    return transport.send([envelope(nl, letter, templates[letter.template]) for letter in letters])


def processes(nl: Newsletter) -> int:
    """How many child processes render and write a send's emails ([smtp] processes, at most one per
    connection; 0: one per CPU core, 1: none, all in this process); 0 for none. A transport
    given in process (not the SMTP connection, as in tests) is never forked."""
    smtp = nl.config.smtp
    if nl.transport_factory != nl.smtp_connection:
        return 0
    wanted = min(smtp.processes or os.cpu_count() or 1, smtp.connections)
    return 0 if wanted == 1 else wanted


class Crew:
    """One courier per connection: in this process, or spread over FORKS child processes."""

    def __init__(self, nl: Newsletter, connections: int, forks: int = 0) -> None:
        self.nl = nl
        self.transports: list[Transport] = []
        self.children: list[tuple[BaseProcess, list[Connection]]] = []
        self.couriers: list[Courier] = []
        if not forks:
            self.transports = [nl.transport() for _ in range(connections)]
            self.couriers = [_InProcess(nl, transport) for transport in self.transports]
            return
        nl.signer  # noqa: B018 (loaded once, here: a [dkim] key that cannot sign fails before any child starts)
        try:
            for number in range(forks):
                self._fork(len(range(number, connections, forks)))
        except BaseException:
            self.close()
            raise

    def _fork(self, connections: int) -> None:
        ends = [multiprocessing.Pipe() for _ in range(connections)]
        # the child closes this process's ends of every pipe, or it would never see them close
        theirs = [pipe for _, pipes in self.children for pipe in pipes] + [parent for parent, _ in ends]
        process = multiprocessing.get_context("fork").Process(
            target=_serve, args=(self.nl, [child for _, child in ends], theirs), name="newsletter-courier", daemon=True
        )
        masked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # until the child ignores them
        gc.freeze()  # the child's collections leave alone what it shares with this process
        try:
            process.start()
        finally:
            gc.unfreeze()
            signal.pthread_sigmask(signal.SIG_SETMASK, masked)
            for _, child in ends:
                child.close()
        pipes = [parent for parent, _ in ends]
        self.children.append((process, pipes))
        self.couriers += [_Forked(pipe, process) for pipe in pipes]

    def close(self) -> None:
        """Close every connection; a child closes its own once told, and is waited for."""
        for transport in self.transports:
            transport.close()
        for _, pipes in self.children:
            for pipe in pipes:
                try:
                    pipe.send(None)
                except OSError:
                    pass
                pipe.close()
        for process, _ in self.children:
            process.join()


class _InProcess:
    def __init__(self, nl: Newsletter, transport: Transport) -> None:
        self.nl, self.transport = nl, transport

    def send(self, letters: Sequence[Letter], templates: Templates) -> list[Result]:
        return _send(self.nl, self.transport, letters, templates)


class _Forked:
    """A connection in a child process, reached through PIPE."""

    def __init__(self, pipe: Connection, process: BaseProcess) -> None:
        self.pipe, self.process = pipe, process
        self.known: set[Hashable] = set()

    def send(self, letters: Sequence[Letter], templates: Templates) -> list[Result]:
        new = {key: templates[key] for key in {letter.template for letter in letters} - self.known}
        try:
            self.pipe.send(([tuple(letter) for letter in letters], new))
            self.known.update(new)
            reply = self.pipe.recv()
        except (EOFError, OSError):
            self.process.join(1)
            raise CourierLost(f"a sending process ended unexpectedly (exit code {self.process.exitcode})") from None
        if isinstance(reply, BaseException):
            raise reply
        return [Result(Outcome(outcome), code, text, stage) for outcome, code, text, stage in reply]


def _serve(nl: Newsletter, pipes: list[Connection], theirs: list[Connection]) -> None:
    """A child: each pipe's connection in a thread of its own, until the parent says stop or is gone.

    Ctrl-C and SIGTERM are ignored here: the parent stops claiming and waits for the batches on the wire,
    which the child finishes and answers.
    """
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    for pipe in theirs:
        pipe.close()
    others = [threading.Thread(target=_connection, args=(nl, pipe)) for pipe in pipes[1:]]
    for thread in others:
        thread.start()
    _connection(nl, pipes[0])
    for thread in others:
        thread.join()


def _connection(nl: Newsletter, pipe: Connection) -> None:
    templates: dict[Hashable, MessageTemplate] = {}
    transport = nl.transport()
    try:
        while True:
            try:
                work = pipe.recv()
            except EOFError:
                return
            if work is None:
                return
            letters, new = work
            templates.update(new)
            reply: list[tuple[str, int | None, str, str]] | BaseException
            try:
                results = _send(nl, transport, [Letter._make(letter) for letter in letters], templates)
                reply = [(r.outcome.value, r.code, r.reply, r.stage) for r in results]
            except Exception as exc:
                reply = exc
            try:
                pipe.send(reply)
            except OSError:
                return
            except Exception:  # an error that cannot be pickled
                pipe.send(RuntimeError(f"{type(reply).__name__}: {reply}"))
    finally:
        transport.close()
