"""The edges of HTTP: which Host the site answers to, HSTS and the security headers on every response (error
pages too, and those waitress writes itself), and the Secure session cookie."""

from __future__ import annotations

import http.client
import logging
import socket
import subprocess
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import requests
from sqlalchemy import func, select

from newsletter.models import Signup, Subscriber
from newsletter.runtime import Newsletter
from newsletter.serving import listen, waitress_server
from newsletter.web.app import create_app

from .conftest import free_port, wait_for
from .test_reader_flow import confirm_link

HSTS = "max-age=31536000"
WHERE = "This site is at https://news.example.com/; the request was addressed to another host."


def ask(base: str, path: str, host: str | None) -> tuple[int, dict[str, str], str]:
    """GET PATH from the server at BASE, naming HOST in the Host header (no Host header at all when None)."""
    address, port = base.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(address, int(port), timeout=10)
    connection.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
    if host is not None:
        connection.putheader("Host", host)
    connection.endheaders()
    response = connection.getresponse()
    answer = response.status, dict(response.getheaders()), response.read().decode()
    connection.close()
    return answer


def wire(port: int, request: bytes) -> tuple[str, dict[str, str], str]:
    """Send REQUEST as raw bytes; the status line, the headers and the body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    status, *lines = head.split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body


def assert_security_headers(headers: Mapping[str, str], hsts: bool = True) -> None:
    assert "script-src 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers.get("Strict-Transport-Security") == (HSTS if hsts else None)


@contextmanager
def served(nl: Newsletter) -> Iterator[str]:
    """The app of NL over HTTP on a port of its own, as `newsletter serve` runs it in one process."""
    sock = listen("127.0.0.1", 0)
    server = waitress_server(create_app(nl), sock, threads=2)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.trigger.pull_trigger(server._map.clear)
        thread.join(timeout=5)
        server.close()
        server.task_dispatcher.shutdown()


def test_only_base_urls_host_and_loopback_names_are_served(site) -> None:
    port = site.base.rsplit(":", 1)[1]
    for host in ("news.example.com", "news.example.com:443", "localhost", f"127.0.0.1:{port}", f"[::1]:{port}"):
        status, _, page = ask(site.base, "/", host)
        assert status == 200 and "Get new posts by email" in page, host
    for host in ("evil.example", "news.example.com.evil.example", "10.0.0.5:8000", "[2001:db8::1]", None):
        status, headers, page = ask(site.base, "/", host)
        assert status == 400 and WHERE in page, host
        assert 'href="/style.css"' in page  # our own error page, whole
        assert_security_headers(headers)
    # load balancers and container probes ask by IP address, or name no host at all
    for host in ("10.0.0.5:8000", None):
        status, _, body = ask(site.base, "/healthz", host)
        assert status == 200 and '"status":"ok"' in body.replace(" ", "")


def test_a_host_label_over_63_characters_gets_400_and_no_traceback(site, caplog) -> None:
    caplog.set_level(logging.INFO)
    status, headers, page = ask(site.base, "/", "a" * 64 + ".example.com")
    assert status == 400 and WHERE in page
    assert_security_headers(headers)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_post_naming_a_forged_host_does_not_pass_for_our_own_page(site) -> None:
    """The form takes posts from its own origin: a forged Host must not make another origin "our own"."""
    forged = site.post(
        "/subscribe",
        data=site.form("victim@example.com"),
        headers={"Host": "evil.example", "Origin": "http://evil.example"},
    )
    assert forged.status_code == 400 and WHERE in forged.text
    site.record_signups()
    with site.nl.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Signup)) == 0
        assert session.scalar(select(func.count()).select_from(Subscriber)) == 0


def test_hsts_and_security_headers_on_every_response_error_pages_too(site, smtp) -> None:
    responses = {
        "page": site.get("/"),
        "stylesheet": site.get("/style.css"),
        "health check": site.get("/healthz"),
        "404": site.get("/missing"),
        "405": site.get("/subscribe"),
        "413": site.post("/subscribe", data={"email": "x" * 70_000}),
        "400 (no CSRF token)": site.post("/confirm/whatever"),
    }
    expected = {"405": 405, "404": 404, "413": 413, "400 (no CSRF token)": 400}
    for name, response in responses.items():
        assert response.status_code == expected.get(name, 200), (name, response.status_code)
        assert_security_headers(response.headers)
    assert "Too much data" in responses["413"].text


def test_waitress_own_error_responses_carry_the_security_headers(config_file: Path, app) -> None:
    """A request too broken to reach the app gets waitress's plain-text 400, with our headers on it.

    (`app` only brings the database to the latest schema for `newsletter serve`.)
    """
    port = free_port()
    server = subprocess.Popen(
        ["newsletter", "--config", str(config_file), "serve", "--port", str(port), "--processes", "2", "--no-worker"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _answering(port), timeout=30)
        for broken in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: localhost\r\nNo colon here\r\n\r\n"):
            status, headers, body = wire(port, broken)
            assert status.endswith("400 Bad Request") and body.endswith("(generated by newsletter)"), body
            assert_security_headers(headers)
    finally:
        server.terminate()
        server.wait(timeout=20)


def _answering(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


def test_the_session_cookie_is_secure_when_base_url_is_https(site, smtp, nl) -> None:
    site.subscribe("ada@example.com")
    site.deliver_outbox()
    link = confirm_link(smtp.to("ada@example.com")[0])
    cookie = site.get(link).headers["Set-Cookie"]
    assert "; Secure" in cookie and "; HttpOnly" in cookie and "; SameSite=Lax" in cookie

    # A site whose base_url is http (the demo, say) sends neither HSTS nor a Secure cookie.
    plain = Newsletter(replace(nl.config, site=replace(nl.config.site, base_url="http://127.0.0.1:8000")))
    with served(plain) as base:
        page = requests.get(base + link.removeprefix(nl.config.base_url), timeout=10)
        assert page.status_code == 200 and "; Secure" not in page.headers["Set-Cookie"]
        assert_security_headers(page.headers, hsts=False)
        missing = requests.get(base + "/missing", timeout=10)
        assert missing.status_code == 404
        assert_security_headers(missing.headers, hsts=False)
    plain.engine.dispose()

    assert "You're subscribed" in site.press(link).text  # a browser sends it back to 127.0.0.1 all the same
