"""The way out for mail: the Transport protocol (a batch of envelopes in, one Result each out), the SMTP
client behind it, and an in-memory transport for tests. DKIM signing wraps any transport (signing.py).

SMTPConnection: one persistent connection, many messages, ESMTP PIPELINING when offered. It is not
thread-safe: give each sending thread its own connection.

With PIPELINING (RFC 2920) each message costs one round trip: the end of one message's
content is written together with the next message's MAIL FROM, RCPT TO and DATA, and the
replies are read in order. Content is never written before the server has answered DATA
with 354, so a refused recipient can never make message text be read as SMTP commands.
"""

from __future__ import annotations

import base64
import enum
import functools
import ipaddress
import logging
import re
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

__all__ = [
    "SECURITY_MODES",
    "Envelope",
    "MailerError",
    "MemoryTransport",
    "Outcome",
    "Result",
    "SMTPConnection",
    "Transport",
]

log = logging.getLogger(__name__)

SECURITY_MODES = ("none", "starttls", "tls")
_MAX_LINE = 8192
_BAD_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


class Outcome(enum.Enum):
    """What became of one message.

    SENT: 250 after end of data. DEFERRED: 4xx, or never handed over (safe to retry, not
    delivered). FAILED: 5xx to MAIL, RCPT or end of data, or an address this client cannot
    send (permanent). UNKNOWN: data was sent but no final reply came (may have been delivered).
    """

    SENT = "sent"
    DEFERRED = "deferred"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Envelope:
    """One message for one recipient; data is the whole message with CRLF line endings, not dot-stuffed.

    `wire_ready` vouches that data has no bare CR or LF and no line starting with a dot (as
    messages.MessageTemplate writes it), so the transport sends it without the pass that checks line endings
    and dot-stuffs; nothing else may set it.
    """

    sender: str
    recipient: str
    data: bytes
    wire_ready: bool = False


@dataclass(frozen=True)
class Result:
    """How one message ended: the reply code that decided it (None if none came) and its one-line text."""

    outcome: Outcome
    code: int | None
    reply: str
    stage: str = ""  # the command whose reply decided it: "mail", "rcpt", "data", or "" when none did


class MailerError(Exception):
    """Connection-level failure that retrying this run will not fix quickly or at all.

    Raised for: cannot connect, TLS handshake or certificate failure, STARTTLS not offered
    when required, authentication refused, EHLO refused. str(e) is one line saying what to fix.
    """


class Transport(Protocol):
    """The way out for mail: send a batch of envelopes, get one Result each, in order.

    `send` raises MailerError only when the server cannot be used at all; every other problem is a Result.
    """

    def send(self, envelopes: Sequence[Envelope]) -> list[Result]: ...

    def close(self) -> None: ...


class MemoryTransport:
    """A transport that keeps what it is given in memory, for tests that need no sockets.

    REPLY decides each envelope's Result (default: accepted) and may raise MailerError to play a server
    that cannot be reached. Several threads may share one.
    """

    def __init__(self, reply: Callable[[Envelope], Result] | None = None) -> None:
        self.reply = reply or (lambda envelope: Result(Outcome.SENT, 250, "250 OK", "data"))
        self.delivered: list[Envelope] = []
        self.closed = 0
        self._lock = threading.Lock()

    def send(self, envelopes: Sequence[Envelope]) -> list[Result]:
        results = [self.reply(envelope) for envelope in envelopes]
        with self._lock:
            self.delivered += [e for e, r in zip(envelopes, results, strict=True) if r.outcome is Outcome.SENT]
        return results

    def close(self) -> None:
        with self._lock:
            self.closed += 1


class _Lost(Exception):
    """The session ended mid-conversation: drop, timeout, 421, or an unreadable reply."""

    def __init__(self, reason: str, code: int | None = None, reply: str = "", sent: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.reply = reply
        self.sent = sent


class _Job:
    __slots__ = ("index", "mail", "rcpt", "payload")

    def __init__(self, index: int, mail: bytes, rcpt: bytes, payload: bytes) -> None:
        self.index = index
        self.mail = mail
        self.rcpt = rcpt
        self.payload = payload


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | BlockingIOError):
        return "timed out"  # BlockingIOError: the kernel's SO_RCVTIMEO or SO_SNDTIMEO ran out (_attach)
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())


@functools.cache
def _local_fqdn() -> str:
    name = socket.getfqdn()
    return name if "." in name and name != "localhost.localdomain" else ""


def _address_literal(address: str) -> str:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return f"[IPv6:{ip.compressed}]" if ip.version == 6 else f"[{ip}]"


def _outcome_for(code: int) -> Outcome:
    if code >= 500:
        return Outcome.FAILED
    if 200 <= code < 300:
        return Outcome.SENT
    return Outcome.DEFERRED


def _stuff(data: bytes) -> bytes:
    """Return data dot-stuffed and terminated with CRLF.CRLF, line endings forced to CRLF."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        data = _LINE_BREAK.sub(b"\r\n", data)
    if not data:
        return b".\r\n"
    data = data.replace(b"\r\n.", b"\r\n..")
    if data[:1] == b".":
        data = b"." + data
    if data[-2:] == b"\r\n":
        return data + b".\r\n"
    return data + b"\r\n.\r\n"


class SMTPConnection:
    """A persistent SMTP client session that sends batches of messages."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        security: str = "none",
        username: str = "",
        password: str = "",
        timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        helo_name: str | None = None,
    ) -> None:
        if security not in SECURITY_MODES:
            raise ValueError(f"security must be one of {', '.join(SECURITY_MODES)}, not {security!r}")
        self.host = host
        self.port = port
        self.security = security
        self.username = username
        self.password = password
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.helo_name = helo_name
        self._sock: socket.socket | None = None  # set while connected
        self._inbox = b""  # what the server sent that is not read yet
        self._extensions: dict[str, str] = {}
        self._need_rset = False

    @property
    def pipelining(self) -> bool:
        """Whether the server offered PIPELINING on the current (or last) connection."""
        return "PIPELINING" in self._extensions

    def __enter__(self) -> SMTPConnection:
        if self._sock is None:
            self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> None:
        """Connect, greet, secure and authenticate; raise MailerError on failure."""
        if self._sock is not None:
            return
        where = f"{self.host}:{self.port}"
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except socket.gaierror as exc:
            raise MailerError(
                f"cannot resolve SMTP host {self.host!r}: {_describe(exc)}; check the host name"
            ) from None
        except OSError as exc:
            raise MailerError(
                f"cannot connect to SMTP server {where}: {_describe(exc)}; "
                "check host, port and that the server is running"
            ) from None
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.security == "tls":
                sock = self._wrap(sock)
            self._attach(sock)
            self._handshake(where)
        except MailerError:
            self._abort()
            raise
        except _Lost as exc:
            self._abort()
            raise MailerError(f"SMTP server {where} ended the session during set-up: {exc.reason}") from None
        except OSError as exc:
            self._abort()
            raise MailerError(f"SMTP session set-up with {where} failed: {_describe(exc)}") from None
        self._need_rset = False
        log.debug("connected to %s (pipelining=%s)", where, self.pipelining)

    def _attach(self, sock: socket.socket) -> None:
        """Use SOCK from now on. A plain socket blocks, and the kernel times out each read and write: with a
        timeout of Python's own, every read and every write would first wait in poll(), one more system
        call and hand-over of the GIL. OpenSSL retries a read the kernel timed out, so TLS keeps Python's."""
        if isinstance(sock, ssl.SSLSocket):
            sock.settimeout(self.timeout)
        else:
            timeval = struct.pack("ll", int(self.timeout), int(self.timeout % 1 * 1_000_000))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            sock.settimeout(None)
        self._sock, self._inbox = sock, b""

    def _wrap(self, sock: socket.socket) -> ssl.SSLSocket:
        context = self.ssl_context or ssl.create_default_context()
        where = f"{self.host}:{self.port}"
        sock.settimeout(self.timeout)
        try:
            return context.wrap_socket(sock, server_hostname=self.host)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise MailerError(
                f"TLS certificate of {where} was not accepted ({exc.verify_message or exc.reason}); "
                "give the server a certificate valid for this host name or pass an ssl_context that trusts it"
            ) from None
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            hint = ""
            if self.security == "tls":
                hint = " (is this port really implicit TLS? use security='starttls' for port 587)"
            raise MailerError(f"TLS handshake with {where} failed: {_describe(exc)}{hint}") from None

    def _handshake(self, where: str) -> None:
        code, text = self._read_reply()
        if code != 220:
            raise MailerError(f"SMTP server {where} refused the session: {text}")
        self._greet(where)
        if self.security == "starttls":
            if "STARTTLS" not in self._extensions:
                raise MailerError(
                    f"SMTP server {where} does not offer STARTTLS; refusing to send in plaintext "
                    "(enable STARTTLS on the server, or use security='tls' for an implicit-TLS port)"
                )
            code, text = self._command(b"STARTTLS\r\n")
            if code != 220:
                raise MailerError(f"SMTP server {where} refused STARTTLS: {text}")
            assert self._sock is not None
            plain, self._sock = self._sock, None  # and whatever came after the 220 in plaintext is dropped
            self._attach(self._wrap(plain))
            self._greet(where)
        if self.username:
            self._authenticate(where)

    def _greet(self, where: str) -> None:
        assert self._sock is not None
        name = self.helo_name or _local_fqdn() or _address_literal(self._sock.getsockname()[0])
        if not name.isascii() or _BAD_ADDRESS.search(name) or " " in name:
            raise MailerError(f"helo_name {name!r} is not a valid host name; use the ASCII (IDNA) form")
        self._write(b"EHLO " + name.encode() + b"\r\n")
        code, lines = self._read_reply_lines()
        if code == 250:
            extensions = {}
            for line in lines[1:]:
                keyword, _, params = line.partition(" ")
                keyword, eq, rest = keyword.partition("=")
                extensions[keyword.upper()] = (rest + " " + params).strip() if eq else params.strip()
            self._extensions = extensions
            return
        ehlo_text = _one_line(f"{code} " + " ".join(lines))
        code, text = self._command(b"HELO " + name.encode() + b"\r\n")
        if code != 250:
            raise MailerError(
                f"SMTP server {where} refused EHLO ({ehlo_text}) and HELO ({text}) "
                f"for name {name!r}; set helo_name to a name the server accepts"
            )
        self._extensions = {}

    def _authenticate(self, where: str) -> None:
        if "AUTH" not in self._extensions:
            raise MailerError(
                f"SMTP server {where} does not offer AUTH (after TLS, if any); "
                "remove the username or enable authentication on the server"
            )
        mechanisms = self._extensions["AUTH"].upper().split()
        user = self.username.encode("utf-8")
        secret = self.password.encode("utf-8")
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + secret)
            code, text = self._command(b"AUTH PLAIN " + token + b"\r\n")
            if code == 334:
                code, text = self._command(token + b"\r\n")
        elif "LOGIN" in mechanisms:
            code, text = self._command(b"AUTH LOGIN\r\n")
            if code == 334:
                code, text = self._command(base64.b64encode(user) + b"\r\n")
            if code == 334:
                code, text = self._command(base64.b64encode(secret) + b"\r\n")
        else:
            offered = self._extensions["AUTH"] or "none"
            raise MailerError(
                f"SMTP server {where} offers no supported AUTH mechanism (offered: {offered}; supported: PLAIN, LOGIN)"
            )
        if code == 334:
            self._write(b"*\r\n")
            code, text = self._read_reply()
        if code != 235:
            raise MailerError(
                f"SMTP server {where} refused authentication as {self.username!r}: {text}; check username and password"
            )

    def _write(self, data: bytes) -> None:
        sock = self._sock
        assert sock is not None
        sent = 0
        try:
            sent = sock.send(data)
            if sent < len(data):
                view = memoryview(data)
                while sent < len(data):
                    sent += sock.send(view[sent:])
        except OSError as exc:
            raise _Lost(f"write failed: {_describe(exc)}", sent=sent) from None

    def _readline(self) -> bytes:
        sock, inbox = self._sock, self._inbox
        assert sock is not None
        end = inbox.find(b"\n")
        while end < 0 and len(inbox) < _MAX_LINE:
            try:
                chunk = sock.recv(_MAX_LINE)
            except OSError as exc:
                raise _Lost(f"read failed: {_describe(exc)}") from None
            if not chunk:
                break
            start, inbox = len(inbox), inbox + chunk
            end = inbox.find(b"\n", start)
        line, self._inbox = (inbox[: end + 1], inbox[end + 1 :]) if end >= 0 else (inbox, b"")
        if line[-1:] != b"\n" or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
            if not line:
                raise _Lost("connection closed by server")
            raise _Lost(f"malformed reply {line[:80]!r}")
        return line

    def _read_reply(self) -> tuple[int, str]:
        line = self._readline()
        if line[3:4] != b"-":
            code = int(line[:3])
            text = line.rstrip(b"\r\n").decode("utf-8", "replace")
        else:
            code, lines = self._read_continued(line)
            text = _one_line(f"{code} " + " ".join(lines))
        if code == 421:
            raise _Lost(f"server closing: {text}", code=421, reply=text)
        return code, text

    def _read_reply_lines(self) -> tuple[int, list[str]]:
        line = self._readline()
        if line[3:4] == b"-":
            code, lines = self._read_continued(line)
        else:
            code, lines = int(line[:3]), [line[4:].rstrip(b"\r\n").decode("utf-8", "replace")]
        if code == 421:
            text = _one_line(f"{code} " + " ".join(lines))
            raise _Lost(f"server closing: {text}", code=421, reply=text)
        return code, lines

    def _read_continued(self, line: bytes) -> tuple[int, list[str]]:
        code = line[:3]
        lines = [line[4:].rstrip(b"\r\n").decode("utf-8", "replace")]
        while line[3:4] == b"-":
            line = self._readline()
            if line[:3] != code:
                raise _Lost(f"malformed multi-line reply {line[:80]!r}")
            lines.append(line[4:].rstrip(b"\r\n").decode("utf-8", "replace"))
        return int(code), lines

    def _command(self, line: bytes) -> tuple[int, str]:
        self._write(line)
        return self._read_reply()

    def _peer_closed(self) -> bool:
        """Whether an idle connection has something unsolicited to read (a close or a 421)."""
        try:
            poller = select.poll()
            assert self._sock is not None
            poller.register(self._sock, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def _abort(self) -> None:
        sock, self._sock, self._inbox = self._sock, None, b""
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        """Send QUIT if the session is up, then close the socket; never raises."""
        if self._sock is None:
            return
        try:
            self._sock.settimeout(min(self.timeout, 5.0))
            self._write(b"QUIT\r\n")
            self._readline()
        except Exception:
            pass
        finally:
            self._abort()

    def send(self, envelopes: Sequence[Envelope]) -> list[Result]:
        """Send each envelope as its own transaction; return one Result per envelope, in order.

        Opens the connection if needed (MailerError if that fails). A drop, timeout or 421
        never raises: the affected messages come back UNKNOWN or DEFERRED and the connection
        is closed, so the next call reopens it.
        """
        if not envelopes:
            return []
        reused = self._sock is not None
        if reused and self._peer_closed():
            log.debug("idle connection to %s:%s was closed by the server; reopening", self.host, self.port)
            self._abort()
            reused = False
        if self._sock is None:
            self.open()
        results: list[Result | None] = [None] * len(envelopes)
        if not self._run(self._prepare(envelopes, results), results, retry_stale=reused):
            self._abort()
            self.open()
            self._run(self._prepare(envelopes, results), results, retry_stale=False)
        return cast(list[Result], results)  # _run has filled every slot

    def _prepare(self, envelopes: Sequence[Envelope], results: list[Result | None]) -> list[_Job]:
        eight_bit = b" BODY=8BITMIME" if "8BITMIME" in self._extensions else b""
        jobs = []
        for index, envelope in enumerate(envelopes):
            if results[index] is not None:
                continue
            sender, recipient = envelope.sender, envelope.recipient
            if not (sender.isascii() and recipient.isascii()):
                reason = f"non-ASCII address not supported (SMTPUTF8 is not used): {sender!r} -> {recipient!r}"
                results[index] = Result(Outcome.FAILED, None, reason)
                continue
            if not recipient or _BAD_ADDRESS.search(sender) or _BAD_ADDRESS.search(recipient):
                results[index] = Result(Outcome.FAILED, None, f"invalid address: {sender!r} -> {recipient!r}")
                continue
            data = envelope.data
            mail = b"MAIL FROM:<" + sender.encode() + (b">\r\n" if data.isascii() else b">" + eight_bit + b"\r\n")
            body = data + b".\r\n" if envelope.wire_ready and data[-2:] == b"\r\n" else _stuff(data)
            jobs.append(_Job(index, mail, b"RCPT TO:<" + recipient.encode() + b">\r\n", body))
        return jobs

    def _run(self, jobs: list[_Job], results: list[Result | None], *, retry_stale: bool) -> bool:
        """Fill results for jobs; False when a reused connection proved stale before anything was handed over."""
        inflight: _Job | None = None
        current: _Job | None = None
        fresh = True
        try:
            if self.pipelining:
                pending: _Job | None = None
                rset = self._need_rset
                for position in range(len(jobs) + 1):
                    job = jobs[position] if position < len(jobs) else None
                    if job is None and pending is None:
                        break
                    parts = []
                    if pending is not None:
                        parts.append(pending.payload)
                    if rset:
                        parts.append(b"RSET\r\n")
                    if job is not None:
                        parts += (job.mail, job.rcpt, b"DATA\r\n")
                    if pending is not None and results[pending.index] is None:
                        inflight = pending
                    self._write(b"".join(parts))
                    if pending is not None:
                        current = pending
                        code, text = self._read_reply()
                        if inflight is not None:
                            results[pending.index] = Result(_outcome_for(code), code, text, "data")
                            inflight = None
                        pending = None
                    if rset:
                        current = None
                        self._read_reply()
                        rset = False
                    if job is not None:
                        current = job
                        mail_code, mail_text = self._read_reply()
                        rcpt_code, rcpt_text = self._read_reply()
                        data_code, data_text = self._read_reply()
                        if mail_code < 300 and rcpt_code < 300 and data_code == 354:
                            pending = job
                        else:
                            results[job.index] = self._refusal(
                                ("mail", mail_code, mail_text),
                                ("rcpt", rcpt_code, rcpt_text),
                                ("data", data_code, data_text),
                            )
                            rset = True
                            if data_code == 354:
                                pending = _Job(job.index, b"", b"", b".\r\n")
                    fresh = False
                self._need_rset = rset
            else:
                rset = self._need_rset
                for job in jobs:
                    if rset:
                        current = None
                        self._command(b"RSET\r\n")
                        rset = False
                    current = job
                    mail_reply = self._command(job.mail)
                    fresh = False
                    if mail_reply[0] >= 300:
                        results[job.index] = self._refusal(("mail", *mail_reply))
                        continue
                    rcpt_reply = self._command(job.rcpt)
                    if rcpt_reply[0] >= 300:
                        results[job.index] = self._refusal(("rcpt", *rcpt_reply))
                        rset = True
                        continue
                    data_reply = self._command(b"DATA\r\n")
                    if data_reply[0] != 354:
                        results[job.index] = self._refusal(("data", *data_reply))
                        rset = True
                        continue
                    inflight = job
                    code, text = self._command(job.payload)
                    results[job.index] = Result(_outcome_for(code), code, text, "data")
                    inflight = None
                self._need_rset = rset
        except _Lost as lost:
            self._abort()
            if inflight is not None and lost.sent is not None and lost.sent < len(inflight.payload):
                inflight = None
            if retry_stale and fresh and inflight is None:
                log.debug(
                    "reused connection to %s:%s failed at once (%s); reopening", self.host, self.port, lost.reason
                )
                return False
            log.info("connection to %s:%s lost: %s", self.host, self.port, lost.reason)
            for job in jobs:
                if results[job.index] is not None:
                    continue
                if lost.code == 421 and job is current:
                    results[job.index] = Result(Outcome.DEFERRED, 421, lost.reply, "")
                elif job is inflight:
                    reason = f"no reply after end of data, delivery unknown: {lost.reason}"
                    results[job.index] = Result(Outcome.UNKNOWN, None, reason)
                else:
                    results[job.index] = Result(Outcome.DEFERRED, None, f"not sent: {lost.reason}")
        return True

    @staticmethod
    def _refusal(*replies: tuple[str, int, str]) -> Result:
        """Result for the first reply that refused the transaction."""
        for stage, code, text in replies:
            if code >= 400:
                return Result(_outcome_for(code), code, text, stage)
        stage, code, text = replies[-1]
        return Result(Outcome.DEFERRED, code, f"unexpected reply: {text}", stage)
