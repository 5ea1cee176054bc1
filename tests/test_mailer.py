"""Tests for the SMTP transport against real servers: aiosmtpd in-process, Postfix's smtp-sink."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from newsletter.mailer import Envelope, MailerError, Outcome, SMTPConnection

SENDER = "news@blog.example"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LenientSMTP(SMTP):
    """aiosmtpd server that accepts lines longer than RFC 5321's 1000 octets."""

    line_length_limit = 8192


class LenientController(Controller):
    def factory(self) -> SMTP:
        return LenientSMTP(self.handler, **self.SMTP_kwargs)


class Handler:
    """Records accepted messages; scripted refusals, closes and delays by recipient or count."""

    def __init__(
        self,
        *,
        pipelining: bool = True,
        mail_replies: dict[str, str] | None = None,
        rcpt_replies: dict[str, str] | None = None,
        data_replies: dict[str, str] | None = None,
        close_at: int | None = None,
        close_with: str = "421",
        slow: dict[str, float] | None = None,
    ) -> None:
        self.pipelining = pipelining
        self.mail_replies = mail_replies or {}
        self.rcpt_replies = rcpt_replies or {}
        self.data_replies = data_replies or {}
        self.close_at = close_at
        self.close_with = close_with
        self.slow = slow or {}
        self.messages: list[tuple[str, list[str], bytes, list[str]]] = []
        self.ehlo_count = 0
        self.data_count = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.ehlo_count += 1
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if address in self.mail_replies:
            return self.mail_replies[address]
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.data_count += 1
        if self.data_count == self.close_at:
            if self.close_with == "421":
                asyncio.get_running_loop().call_soon(server.transport.close)
                return "421 4.3.2 Service shutting down"
            server.transport.abort()
            return "250 never sent"
        recipient = envelope.rcpt_tos[0]
        if recipient in self.slow:
            await asyncio.sleep(self.slow[recipient])
        if recipient in self.data_replies:
            return self.data_replies[recipient]
        record = (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content, envelope.mail_options)
        self.messages.append(record)
        return f"250 2.0.0 Ok: queued as Q{len(self.messages)}"

    def delivered_to(self) -> list[str]:
        return [rcpts[0] for _, rcpts, _, _ in self.messages]


@pytest.fixture
def serve():
    controllers: list[Controller] = []

    def start(handler: Handler, **kwargs) -> int:
        port = free_port()
        controller = LenientController(handler, hostname="127.0.0.1", port=port, server_hostname="mx.test", **kwargs)
        controller.start()
        controllers.append(controller)
        return port

    yield start
    for controller in controllers:
        controller.stop()


def message(n: int, body: bytes = b"") -> bytes:
    return (
        b"From: News <news@blog.example>\r\nTo: reader@example.org\r\n"
        b"Subject: post " + str(n).encode() + b"\r\n\r\n" + (body or b"Hello, reader " + str(n).encode() + b".\r\n")
    )


def envelopes(recipients: list[str]) -> list[Envelope]:
    return [Envelope(SENDER, rcpt, message(i)) for i, rcpt in enumerate(recipients)]


TRICKY_BODIES = [
    b".leading dot on the first line\r\n..two dots\r\n.\r\nthe line above is a lone dot\r\n",
    b"long line: " + b"y" * 1200 + b"\r\n.\r\n",
    "Grüße aus Köln — ünïcödé body ✓\r\n.ñ starts with a dot\r\n".encode(),
    b"no final line break\r\n.",
]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-command-per-round-trip"])
def test_content_round_trips_byte_for_byte(serve, pipelining):
    handler = Handler(pipelining=pipelining)
    port = serve(handler)
    datas = [message(i, body) for i, body in enumerate(TRICKY_BODIES)]
    datas.append(b".first byte is a dot\r\nSubject: x\r\n\r\nbody\r\n")
    batch = [Envelope(SENDER, f"r{i}@example.org", data) for i, data in enumerate(datas)]
    with SMTPConnection("127.0.0.1", port, timeout=5) as conn:
        assert conn.pipelining is pipelining
        results = conn.send(batch)
    assert [r.outcome for r in results] == [Outcome.SENT] * len(batch)
    assert all(r.code == 250 and r.reply.startswith("250 2.0.0 Ok: queued as Q") for r in results)
    assert handler.ehlo_count == 1
    for (sender, rcpts, content, options), envelope in zip(handler.messages, batch, strict=True):
        assert sender == SENDER and rcpts == [envelope.recipient]
        expected = envelope.data if envelope.data.endswith(b"\r\n") else envelope.data + b"\r\n"
        assert content == expected
        assert ("BODY=8BITMIME" in options) == (not envelope.data.isascii())


def test_bare_line_feeds_are_sent_as_crlf(serve):
    handler = Handler()
    port = serve(handler)
    data = b"Subject: lf\n\nline one\n.\nline after a bare-LF dot\r\nmixed\rend\r\n"
    with SMTPConnection("127.0.0.1", port, timeout=5) as conn:
        results = conn.send([Envelope(SENDER, "r@example.org", data)])
    assert results[0].outcome is Outcome.SENT
    expected = b"Subject: lf\r\n\r\nline one\r\n.\r\nline after a bare-LF dot\r\nmixed\r\nend\r\n"
    assert handler.messages[0][2] == expected


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-command-per-round-trip"])
def test_refusals_affect_only_their_own_message(serve, pipelining):
    handler = Handler(
        pipelining=pipelining,
        mail_replies={"blocked@blog.example": "553 5.7.1 sender rejected"},
        rcpt_replies={
            "gone@example.org": "550 5.1.1 no such user",
            "busy@example.org": "451 4.3.0 try again later",
        },
        data_replies={
            "spamtrap@example.org": "554 5.7.1 content rejected",
            "full@example.org": "452 4.2.2 mailbox full",
        },
    )
    port = serve(handler)
    recipients = [
        "a@example.org",
        "gone@example.org",
        "b@example.org",
        "busy@example.org",
        "gone@example.org",
        "c@example.org",
        "spamtrap@example.org",
        "d@example.org",
        "full@example.org",
        "e@example.org",
    ]
    batch = envelopes(recipients)
    batch.insert(6, Envelope("blocked@blog.example", "f@example.org", message(99)))
    with SMTPConnection("127.0.0.1", port, timeout=5) as conn:
        results = conn.send(batch)
        assert conn.send(envelopes(["g@example.org"]))[0].outcome is Outcome.SENT
    expected = {
        "gone@example.org": (Outcome.FAILED, 550, "550 5.1.1 no such user"),
        "busy@example.org": (Outcome.DEFERRED, 451, "451 4.3.0 try again later"),
        "f@example.org": (Outcome.FAILED, 553, "553 5.7.1 sender rejected"),
        "spamtrap@example.org": (Outcome.FAILED, 554, "554 5.7.1 content rejected"),
        "full@example.org": (Outcome.DEFERRED, 452, "452 4.2.2 mailbox full"),
    }
    for envelope, result in zip(batch, results, strict=True):
        want = expected.get(envelope.recipient, (Outcome.SENT, 250, None))
        assert (result.outcome, result.code) == want[:2], envelope.recipient
        if want[2]:
            assert result.reply == want[2]
    assert handler.delivered_to() == [f"{name}@example.org" for name in "abcdeg"]
    assert handler.ehlo_count == 1


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-command-per-round-trip"])
def test_421_after_some_messages_defers_the_rest_and_next_send_reconnects(serve, pipelining):
    handler = Handler(pipelining=pipelining, close_at=4, close_with="421")
    port = serve(handler)
    batch = envelopes([f"r{i}@example.org" for i in range(8)])
    with SMTPConnection("127.0.0.1", port, timeout=5) as conn:
        results = conn.send(batch)
        assert [r.outcome for r in results[:3]] == [Outcome.SENT] * 3
        assert (results[3].outcome, results[3].code) == (Outcome.DEFERRED, 421)
        assert results[3].reply == "421 4.3.2 Service shutting down"
        assert all(r.outcome is Outcome.DEFERRED for r in results[4:])
        retry = [e for e, r in zip(batch, results, strict=True) if r.outcome is not Outcome.SENT]
        assert [r.outcome for r in conn.send(retry)] == [Outcome.SENT] * 5
    assert handler.delivered_to() == [e.recipient for e in batch]
    assert handler.ehlo_count == 2


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-command-per-round-trip"])
def test_dropped_connection_gives_unknown_then_deferred_and_next_send_reconnects(serve, pipelining):
    handler = Handler(pipelining=pipelining, close_at=3, close_with="drop")
    port = serve(handler)
    batch = envelopes([f"r{i}@example.org" for i in range(6)])
    with SMTPConnection("127.0.0.1", port, timeout=5) as conn:
        results = conn.send(batch)
        assert [r.outcome for r in results] == [Outcome.SENT] * 2 + [Outcome.UNKNOWN] + [Outcome.DEFERRED] * 3
        assert results[2].code is None and "delivery unknown" in results[2].reply
        assert all(r.code is None and r.reply.startswith("not sent:") for r in results[3:])
        assert [r.outcome for r in conn.send(batch[2:])] == [Outcome.SENT] * 4
    assert handler.delivered_to() == [e.recipient for e in batch]
    assert handler.ehlo_count == 2


def test_final_reply_later_than_timeout_is_unknown(serve):
    handler = Handler(slow={"slow@example.org": 2.0})
    port = serve(handler)
    batch = envelopes(["a@example.org", "slow@example.org", "b@example.org"])
    conn = SMTPConnection("127.0.0.1", port, timeout=0.5)
    started = time.monotonic()
    results = conn.send(batch)
    assert time.monotonic() - started < 1.5
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.UNKNOWN, Outcome.DEFERRED]
    assert "timed out" in results[1].reply
    conn.close()


def test_idle_connection_closed_by_server_is_reopened(serve):
    handler = Handler()
    port = serve(handler, timeout=0.3)
    with SMTPConnection("127.0.0.1", port, timeout=5) as conn:
        assert conn.send(envelopes(["a@example.org"]))[0].outcome is Outcome.SENT
        time.sleep(0.8)
        assert [r.outcome for r in conn.send(envelopes(["b@example.org", "c@example.org"]))] == [Outcome.SENT] * 2
    assert handler.ehlo_count == 2
    assert handler.delivered_to() == ["a@example.org", "b@example.org", "c@example.org"]


def test_non_ascii_and_malformed_addresses_fail_only_that_message(serve):
    handler = Handler()
    port = serve(handler)
    batch = [
        Envelope(SENDER, "a@example.org", message(0)),
        Envelope(SENDER, "jürgen@example.org", message(1)),
        Envelope("nëws@blog.example", "b@example.org", message(2)),
        Envelope(SENDER, "x@example.org>\r\nRCPT TO:<y@example.org", message(3)),
        Envelope(SENDER, "c@example.org", message(4)),
    ]
    with SMTPConnection("127.0.0.1", port, timeout=5) as conn:
        results = conn.send(batch)
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.FAILED, Outcome.FAILED, Outcome.FAILED, Outcome.SENT]
    assert "non-ASCII" in results[1].reply and "non-ASCII" in results[2].reply
    assert "invalid address" in results[3].reply
    assert handler.delivered_to() == ["a@example.org", "c@example.org"]


def test_send_of_nothing_does_not_connect():
    conn = SMTPConnection("127.0.0.1", free_port(), timeout=1)
    assert conn.send([]) == []


def test_starttls_required_but_not_offered_raises(serve):
    port = serve(Handler())
    conn = SMTPConnection("127.0.0.1", port, security="starttls", timeout=5)
    with pytest.raises(MailerError, match="does not offer STARTTLS") as caught:
        conn.open()
    assert "\n" not in str(caught.value)
    with pytest.raises(MailerError):
        conn.send(envelopes(["a@example.org"]))


def test_connection_refused_raises_one_line():
    port = free_port()
    conn = SMTPConnection("127.0.0.1", port, timeout=2)
    with pytest.raises(MailerError) as caught:
        conn.send(envelopes(["a@example.org"]))
    text = str(caught.value)
    assert "\n" not in text and f"127.0.0.1:{port}" in text and "refused" in text.lower()
    conn.close()


def test_close_is_idempotent_and_quiet(serve):
    port = serve(Handler())
    conn = SMTPConnection("127.0.0.1", port, timeout=5)
    conn.close()
    conn.open()
    conn.close()
    conn.close()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_auth_over_plaintext_when_security_none(serve):
    handler = Handler()
    accepted = {(b"editor", b"s3cret pass")}
    port = serve(
        handler,
        auth_require_tls=False,
        auth_required=True,
        auth_callback=lambda mechanism, login, password: (login, password) in accepted,
    )
    with SMTPConnection("127.0.0.1", port, username="editor", password="s3cret pass", timeout=5) as conn:
        assert conn.send(envelopes(["a@example.org"]))[0].outcome is Outcome.SENT
    with pytest.raises(MailerError, match="refused authentication as 'editor'"):
        SMTPConnection("127.0.0.1", port, username="editor", password="wrong", timeout=5).open()


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_mechanisms(serve, mechanism):
    others = {"PLAIN": ["LOGIN"], "LOGIN": ["PLAIN"]}[mechanism]
    seen = []

    def check(mech, login, password):
        seen.append(mech)
        return (login, password) == (b"editor", "pässword".encode())

    port = serve(Handler(), auth_require_tls=False, auth_exclude_mechanism=others, auth_callback=check)
    with SMTPConnection("127.0.0.1", port, username="editor", password="pässword", timeout=5) as conn:
        assert conn.send(envelopes(["a@example.org"]))[0].outcome is Outcome.SENT
    assert seen == [mechanism]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl tool."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command-line tool is needed to make test certificates")
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=Mailer Test CA")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )
    return d


def server_context(certs: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "server.pem", certs / "server.key")
    return context


def client_context(certs: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs / "ca.pem"))


def test_starttls_then_auth(serve, certificates):
    handler = Handler()
    port = serve(
        handler,
        tls_context=server_context(certificates),
        require_starttls=True,
        auth_required=True,
        auth_callback=lambda mechanism, login, password: (login, password) == (b"editor", b"pw"),
    )
    with SMTPConnection(
        "127.0.0.1",
        port,
        security="starttls",
        username="editor",
        password="pw",
        timeout=5,
        ssl_context=client_context(certificates),
    ) as conn:
        assert conn.pipelining
        results = conn.send(envelopes(["a@example.org", "b@example.org"]))
    assert [r.outcome for r in results] == [Outcome.SENT] * 2
    assert handler.ehlo_count == 2
    assert handler.delivered_to() == ["a@example.org", "b@example.org"]


def test_starttls_with_untrusted_certificate_raises(serve, certificates):
    port = serve(Handler(), tls_context=server_context(certificates), require_starttls=True)
    with pytest.raises(MailerError, match="certificate") as caught:
        SMTPConnection("127.0.0.1", port, security="starttls", timeout=5).open()
    assert "\n" not in str(caught.value)


def test_implicit_tls(serve, certificates):
    handler = Handler()
    port = serve(handler, ssl_context=server_context(certificates))
    context = client_context(certificates)
    with SMTPConnection("127.0.0.1", port, security="tls", timeout=5, ssl_context=context) as conn:
        assert [r.outcome for r in conn.send(envelopes(["a@example.org", "b@example.org"]))] == [Outcome.SENT] * 2
    assert handler.delivered_to() == ["a@example.org", "b@example.org"]
    with pytest.raises(MailerError, match="TLS handshake"):
        SMTPConnection("127.0.0.1", serve(Handler()), security="tls", timeout=5).open()


def test_a_final_reply_later_than_timeout_over_tls_is_unknown_and_says_timed_out(serve, certificates):
    """The kernel times out reads on an encrypted connection as on a plain one."""
    handler = Handler(slow={"slow@example.org": 2.0})
    port = serve(handler, ssl_context=server_context(certificates))
    context = client_context(certificates)
    conn = SMTPConnection("127.0.0.1", port, security="tls", timeout=0.5, ssl_context=context)
    started = time.monotonic()
    results = conn.send(envelopes(["a@example.org", "slow@example.org", "b@example.org"]))
    assert time.monotonic() - started < 1.5
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.UNKNOWN, Outcome.DEFERRED]
    assert "timed out" in results[1].reply
    conn.close()


class ScriptedServer:
    """A raw-socket SMTP server, one connection at a time, whose replies come from a script.

    respond(line) gets each command line (str, no CRLF) and "." at the end of data, and
    returns the reply (lines joined by CRLF); a 354 reply switches to reading message data.
    With reset_in_data, the server reads a little data after 354 and then resets the connection.
    """

    def __init__(self, respond, *, greeting: str = "220 scripted.test ESMTP", reset_in_data: bool = False) -> None:
        self.respond = respond
        self.greeting = greeting
        self.reset_in_data = reset_in_data
        self.messages: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                try:
                    self._session(conn)
                except OSError:
                    pass

    def _session(self, conn: socket.socket) -> None:
        rfile = conn.makefile("rb")
        conn.sendall(self.greeting.encode() + b"\r\n")
        while line := rfile.readline():
            reply = self.respond(line.rstrip(b"\r\n").decode())
            conn.sendall(reply.encode() + b"\r\n")
            if reply.startswith("221"):
                return
            if reply.startswith("354"):
                if self.reset_in_data:
                    rfile.read(65536)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                lines = []
                while (data_line := rfile.readline()) != b".\r\n":
                    if not data_line:
                        return
                    lines.append(data_line)
                self.messages.append(b"".join(lines))
                conn.sendall(self.respond(".").encode() + b"\r\n")

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def scripted():
    servers: list[ScriptedServer] = []

    def start(respond, **kwargs) -> ScriptedServer:
        servers.append(ScriptedServer(respond, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def answer(rules: dict[str, str], *, ehlo: str = "250-scripted.test\r\n250 8BITMIME"):
    """A script: the first rule whose key starts the line wins, then defaults that accept everything."""
    defaults = {
        "EHLO": ehlo,
        "HELO": "250 scripted.test",
        "QUIT": "221 bye",
        "RSET": "250 reset",
        "MAIL": "250 ok",
        "RCPT": "250 ok",
        "DATA": "354 go on",
        ".": "250 queued",
    }

    def respond(line: str) -> str:
        for key, reply in [*rules.items(), *defaults.items()]:
            if line.upper().startswith(key.upper()):
                return reply
        return "500 unknown command"

    return respond


def test_multi_line_replies_are_joined_into_one_line(scripted):
    server = scripted(
        answer(
            {
                ".": "250-2.0.0 accepted\r\n250-for delivery\r\n250 queued as A1",
                "RCPT TO:<gone@": "550-5.1.1 no such user\r\n550 5.1.1 see the docs",
            }
        )
    )
    with SMTPConnection("127.0.0.1", server.port, timeout=5) as conn:
        results = conn.send(envelopes(["a@example.org", "gone@example.org", "b@example.org"]))
    assert [(r.outcome, r.code) for r in results] == [(Outcome.SENT, 250), (Outcome.FAILED, 550), (Outcome.SENT, 250)]
    assert results[0].reply == "250 2.0.0 accepted for delivery queued as A1"
    assert results[1].reply == "550 5.1.1 no such user 5.1.1 see the docs"


def test_ehlo_refused_falls_back_to_helo(scripted):
    server = scripted(answer({"EHLO": "502 5.5.1 command not implemented"}))
    with SMTPConnection("127.0.0.1", server.port, timeout=5, helo_name="mailer.blog.example") as conn:
        assert not conn.pipelining
        assert [r.outcome for r in conn.send(envelopes(["a@example.org", "b@example.org"]))] == [Outcome.SENT] * 2
    assert server.messages == [message(0), message(1)]


def test_ehlo_and_helo_refused_raises(scripted):
    server = scripted(answer({"EHLO": "550 go away", "HELO": "550 go away"}))
    with pytest.raises(MailerError, match="refused EHLO"):
        SMTPConnection("127.0.0.1", server.port, timeout=5).open()


def test_greeting_refusal_raises(scripted):
    server = scripted(answer({}), greeting="554 5.7.1 no service for you")
    with pytest.raises(MailerError, match="554 5.7.1 no service for you"):
        SMTPConnection("127.0.0.1", server.port, timeout=5).open()


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-command-per-round-trip"])
def test_data_accepted_after_refused_recipient_is_ended_without_content(scripted, pipelining):
    ehlo = "250-scripted.test\r\n250 PIPELINING" if pipelining else "250 scripted.test"
    server = scripted(answer({"RCPT TO:<gone@": "550 5.1.1 no such user"}, ehlo=ehlo))
    with SMTPConnection("127.0.0.1", server.port, timeout=5) as conn:
        results = conn.send(envelopes(["gone@example.org", "a@example.org"]))
    assert [(r.outcome, r.code) for r in results] == [(Outcome.FAILED, 550), (Outcome.SENT, 250)]
    assert message(0) not in b"".join(server.messages)
    assert server.messages[-1] == message(1)


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-command-per-round-trip"])
def test_reset_while_writing_data_is_deferred_not_unknown(scripted, pipelining):
    ehlo = "250-scripted.test\r\n250 PIPELINING" if pipelining else "250 scripted.test"
    server = scripted(answer({}, ehlo=ehlo), reset_in_data=True)
    big = message(0, (b"z" * 998 + b"\r\n") * 40_000)
    with SMTPConnection("127.0.0.1", server.port, timeout=5) as conn:
        results = conn.send([Envelope(SENDER, "a@example.org", big), Envelope(SENDER, "b@example.org", message(1))])
    assert [r.outcome for r in results] == [Outcome.DEFERRED, Outcome.DEFERRED]
    assert results[0].reply.startswith("not sent:")


def test_stale_connection_found_on_first_reply_is_reopened_and_resent(serve, monkeypatch):
    handler = Handler()
    port = serve(handler, timeout=0.3)
    with SMTPConnection("127.0.0.1", port, timeout=5) as conn:
        assert conn.send(envelopes(["a@example.org"]))[0].outcome is Outcome.SENT
        time.sleep(0.8)
        monkeypatch.setattr(conn, "_peer_closed", lambda: False)
        assert [r.outcome for r in conn.send(envelopes(["b@example.org", "c@example.org"]))] == [Outcome.SENT] * 2
    assert handler.ehlo_count == 2
    assert handler.delivered_to() == ["a@example.org", "b@example.org", "c@example.org"]


SMTP_SINK = next((p for p in ("/usr/sbin/smtp-sink", shutil.which("smtp-sink")) if p and os.path.exists(p)), None)


@pytest.fixture
def smtp_sink(tmp_path):
    if SMTP_SINK is None:
        pytest.skip("Postfix's smtp-sink is not installed (Debian package postfix)")
    processes = []

    def start(*flags: str) -> tuple[int, Path]:
        port = free_port()
        counter = tmp_path / f"counter-{port}.txt"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        with open(counter, "wb") as out:
            command = [SMTP_SINK, *user, *flags, "-c", f"127.0.0.1:{port}", "1000"]
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        processes.append(proc)
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(f"smtp-sink did not start: {counter.read_text(errors='replace')}")
                time.sleep(0.05)
        return port, counter

    yield start
    for proc in processes:
        proc.terminate()
        proc.wait(timeout=5)


def sink_message_count(counter: Path, expected: int) -> int:
    deadline = time.monotonic() + 5
    while True:
        records = [r for r in counter.read_bytes().split(b"\r") if b"mesg=" in r]
        count = int(records[-1].rsplit(b"mesg=", 1)[1].split()[0]) if records else 0
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("flags", "total", "pipelining"), [((), 2000, True), (("-p",), 200, False)], ids=["pipelined", "no-pipelining"]
)
def test_smtp_sink_counts_every_message(smtp_sink, flags, total, pipelining):
    port, counter = smtp_sink(*flags)
    body = (b"x" * 76 + b"\r\n") * 50 + b".dot-started line\r\n"
    batch = [Envelope(SENDER, f"r{i}@example.org", message(i, body)) for i in range(total)]
    with SMTPConnection("127.0.0.1", port, timeout=10) as conn:
        assert conn.pipelining is pipelining
        results = []
        for start in range(0, total, 500):
            results += conn.send(batch[start : start + 500])
    assert [r.outcome for r in results] == [Outcome.SENT] * total
    assert sink_message_count(counter, total) == total
