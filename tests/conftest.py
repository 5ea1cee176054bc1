"""Fixtures: a real SMTP server (aiosmtpd), a fresh database per test, the app over real HTTP, the CLI."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.cookiejar import Cookie, DefaultCookiePolicy
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import pytest
import requests
from aiosmtpd.controller import Controller
from click.testing import CliRunner, Result
from flask import Flask
from itsdangerous import TimestampSigner
from requests.cookies import RequestsCookieJar
from sqlalchemy import create_engine, text
from waitress.server import create_server

from newsletter import db
from newsletter.cli import cli
from newsletter.config import load_config
from newsletter.mailer import MemoryTransport
from newsletter.runtime import Newsletter
from newsletter.serving import WAITRESS_OPTIONS
from newsletter.signups import process_signups
from newsletter.tokens import FORM_SALT
from newsletter.web.app import create_app
from newsletter.worker import work_once

FEEDS = Path(__file__).parent / "feeds"
H = TypeVar("H")
POSTGRES_URL = os.environ.get("NEWSLETTER_TEST_POSTGRES_URL")


def free_port() -> int:
    """A port nothing listens on, below the kernel's ephemeral range: a port the kernel hands out would soon
    be the source port of some test's outgoing connection, and the server meant for it could not bind."""
    low, _ = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    while True:
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def children(pid: int) -> set[int]:
    """The processes PID has started that are still running."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found.update(int(child) for child in (task / "children").read_text().split())
    return found


@dataclass
class Caught:
    sender: str
    recipients: list[str]
    raw: bytes

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.raw, policy=policy.default)  # type: ignore[return-value]

    @property
    def text(self) -> str:
        return self.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]

    @property
    def html(self) -> str:
        return self.message.get_body(("html",)).get_content()  # type: ignore[union-attr]

    def links(self) -> list[str]:
        return re.findall(r"https?://[^\s<>\"]+", self.text)


@dataclass
class SMTPSink:
    """aiosmtpd handler that keeps every message; `reply` can script a refusal per recipient."""

    messages: list[Caught] = field(default_factory=list)
    reply: Callable[[str], str | None] = lambda recipient: None
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        refusal = self.reply(address)
        if refusal:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append(Caught(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 Message accepted"

    def to(self, address: str) -> list[Caught]:
        return [m for m in self.messages if address.lower() in (r.lower() for r in m.recipients)]

    def subjects(self, address: str) -> list[str]:
        return [m.message["Subject"] for m in self.to(address)]

    def clear(self) -> None:
        self.messages.clear()


@pytest.fixture
def smtp_port() -> int:
    return free_port()


@pytest.fixture
def smtp(smtp_port: int) -> Iterator[SMTPSink]:
    with serving(SMTPSink(), smtp_port) as sink:
        yield sink


@contextlib.contextmanager
def serving(handler: H, port: int) -> Iterator[H]:
    """An SMTP server on PORT answering with HANDLER (an aiosmtpd handler) until the block ends."""
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler
    finally:
        controller.stop()


@contextlib.contextmanager
def empty_database(tmp_path: Path, name: str) -> Iterator[str]:
    """The URL of a new, empty database: a PostgreSQL database of its own (dropped afterwards) when
    NEWSLETTER_TEST_POSTGRES_URL is set, else the SQLite file NAME.db in TMP_PATH."""
    if not POSTGRES_URL:
        yield f"sqlite:///{tmp_path / name}.db"
        return
    database = f"{name[0]}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {database}"))
    yield POSTGRES_URL.rsplit("/", 1)[0] + "/" + database
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    with empty_database(tmp_path, "newsletter") as url:
        yield url


@pytest.fixture
def feed(tmp_path: Path) -> Path:
    """The blog's feed: a WordPress-shaped RSS file the test can publish new items into."""
    path = tmp_path / "feed.xml"
    shutil.copy(FEEDS / "wordpress-rss2.xml", path)
    return path


def publish(feed: Path, title: str, slug: str, summary: str = "<p>Fresh words.</p>") -> str:
    """Add an item at the top of FEED, as the blog does when it publishes; returns the post URL."""
    url = f"https://harbour-notes.example/2025/04/{slug}/"
    item = (
        f'<item><title>{title}</title><link>{url}</link><guid isPermaLink="false">{url}</guid>'
        f"<pubDate>Tue, 01 Apr 2025 10:00:00 +0000</pubDate>"
        f"<description><![CDATA[{summary}]]></description></item>\n\t<item>"
    )
    feed.write_text(feed.read_text(encoding="utf-8").replace("<item>", item, 1), encoding="utf-8")
    return url


@pytest.fixture
def extra_config() -> str:
    """TOML appended to the test's config file; a test module overrides this fixture to change settings."""
    return ""


@pytest.fixture
def config_file(tmp_path: Path, database_url: str, smtp_port: int, feed: Path, extra_config: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[site]
name = "Harbour Notes"
base_url = "https://news.example.com"
feed_url = "{feed}"

[security]
secret_key = "test-secret-{uuid.uuid4().hex}"

[database]
url = "{database_url}"

[smtp]
host = "127.0.0.1"
port = {smtp_port}
security = "none"
from = "Harbour Notes <news@harbour-notes.example>"
timeout = 5
connections = 2
batch_size = 10
"""
        + extra_config
    )
    return path


@pytest.fixture
def nl(config_file: Path) -> Iterator[Newsletter]:
    """The installation the test's config describes, on its upgraded database."""
    runtime = Newsletter(load_config(config_file))
    db.upgrade(runtime.engine)
    yield runtime
    runtime.engine.dispose()


@pytest.fixture
def app(nl: Newsletter) -> Flask:
    return create_app(nl)


def form_data(nl: Newsletter, address: str, opened_ago: float = 30, **fields: str) -> dict[str, str]:
    """What our subscribe form sends for ADDRESS when its page was opened OPENED_AGO seconds earlier."""
    signer = TimestampSigner([nl.config.security.secret_key], salt=FORM_SALT)
    signer.get_timestamp = lambda: int(time.time() - opened_ago)  # type: ignore[method-assign]
    return {"email": address, "started": signer.sign("form").decode(), "website": "", **fields}


class LoopbackIsSecure(DefaultCookiePolicy):
    """As browsers do, send `Secure` cookies to http://localhost and 127.0.0.1: those are secure contexts."""

    def return_ok_secure(self, cookie: Cookie, request: urllib.request.Request) -> bool:
        loopback = urlsplit(request.get_full_url()).hostname in ("localhost", "127.0.0.1", "::1")
        return loopback or super().return_ok_secure(cookie, request)


class Browser(requests.Session):
    """A session whose cookies follow LoopbackIsSecure (requests builds each request's cookie jar afresh, with
    the default policy)."""

    def prepare_request(self, request: requests.Request) -> requests.PreparedRequest:
        prepared = super().prepare_request(request)
        jar = RequestsCookieJar(policy=LoopbackIsSecure())
        jar.update(self.cookies)
        prepared.headers.pop("Cookie", None)
        prepared.prepare_cookies(jar)
        return prepared


class Site:
    """The app served by waitress on a real port, with helpers a test reads like a user's session."""

    def __init__(self, app, base: str) -> None:
        self.app, self.base = app, base
        self.nl: Newsletter = app.extensions["newsletter"]

    def url(self, public_url: str) -> str:
        """The local address of a link that an email gives with the public base_url."""
        return public_url.replace(self.nl.config.base_url, self.base)

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url(path) if path.startswith("http") else self.base + path, timeout=10, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(
            self.url(path) if path.startswith("http") else self.base + path, timeout=10, allow_redirects=False, **kwargs
        )

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        url = self.url(path) if path.startswith("http") else self.base + path
        return requests.request(method, url, timeout=10, allow_redirects=False, **kwargs)

    def press(
        self, link: str, times: int = 1, data: dict[str, object] | None = None, page: str | None = None
    ) -> requests.Response:
        """Open PAGE (default: LINK) like a browser and press a button on it that posts DATA with the page's
        CSRF token to LINK, TIMES times."""
        browser = Browser()
        opened = browser.get(
            self.url(page or link) if (page or link).startswith("http") else self.base + (page or link)
        )
        token = re.search(r'name="csrf_token" value="([^"]+)"', opened.text)
        fields = {**(data or {}), **({"csrf_token": token.group(1)} if token else {})}
        target = self.url(link) if link.startswith("http") else self.base + link
        for _ in range(times):
            response = browser.post(target, data=fields, timeout=10, allow_redirects=False)
        return response

    def form(self, address: str, opened_ago: float = 30, **fields: str) -> dict[str, str]:
        return form_data(self.nl, address, opened_ago, **fields)

    def subscribe(self, address: str, **kwargs) -> requests.Response:
        """A reader fills in our form and sends it."""
        return self.post("/subscribe", data=self.form(address), **kwargs)

    def record_signups(self) -> int:
        """The worker's first step: turn the logged sign-ups into subscribers and confirmation emails."""
        return process_signups(self.nl)

    def deliver_outbox(self) -> None:
        """The worker's pass: record the sign-ups, then send what is due."""
        work_once(self.nl)


@pytest.fixture
def site(app) -> Iterator[Site]:
    server = create_server(app, host="127.0.0.1", port=0, threads=4, **WAITRESS_OPTIONS)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield Site(app, f"http://127.0.0.1:{server.effective_port}")
    server.trigger.pull_trigger(server._map.clear)  # ends waitress's loop from inside its own thread
    thread.join(timeout=5)
    server.close()
    server.task_dispatcher.shutdown()


@pytest.fixture
def run(config_file: Path, app) -> Callable[..., Result]:
    """Run a `newsletter` command as a user would, on the test's upgraded database; returns click's Result."""
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None) -> Result:
        return runner.invoke(cli, ["--config", str(config_file), *args], input=input, catch_exceptions=False)

    return invoke


def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


READERS = [f"reader{i:03d}@example.com" for i in range(120)]


@pytest.fixture
def readers(run, tmp_path: Path, feed: Path) -> list[str]:
    """120 confirmed subscribers and one new post waiting to be announced."""
    csv = tmp_path / "readers.csv"
    csv.write_text("email\n" + "\n".join(READERS) + "\n")
    assert run("subscribers", "import", str(csv)).exit_code == 0
    assert run("posts", "fetch").exit_code == 0
    publish(feed, "Storm warning", "storm")
    return READERS


@pytest.fixture
def memory(nl: Newsletter) -> MemoryTransport:
    """The in-memory transport in place of SMTP, for tests of the engine itself."""
    transport = MemoryTransport()
    nl.transport_factory = lambda: transport
    return transport
