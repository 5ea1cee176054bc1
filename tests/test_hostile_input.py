"""Hostile input on every route and command: hypothesis sends random, malformed, oversized and forged requests.

Whatever arrives, the app answers with a page of its own (never a 5xx, never a traceback or an exception
name), a request that gets a 4xx stores nothing, and a command ends with status 0, 1 or 2 and, when it
fails, one line saying what to fix. The number of inputs tried per route and command is printed at the
end of the module.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import socket
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode

import pytest
import requests
import werkzeug.formparser  # noqa: F401  (registers the "werkzeug.url_quote" codec error handler)
from click.testing import CliRunner, Result
from email_validator import EmailNotValidError, validate_email
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from itsdangerous import URLSafeSerializer, URLSafeTimedSerializer
from markupsafe import escape
from sqlalchemy import func, select
from werkzeug.http import parse_options_header

from newsletter.cli import cli
from newsletter.models import OutboxMessage, Post, Signup, Status, Subscriber
from newsletter.roster import add
from newsletter.serving import WAITRESS_OPTIONS
from newsletter.subscriptions import Requester
from newsletter.tokens import CONFIRM_SALT, UNSUBSCRIBE_SALT

from .conftest import publish

RATE_LIMIT_OFF = '[web]\nrate_limit = "100000 per hour"\n'
MAX_CONTENT_LENGTH = 64 * 1024
FORM = "application/x-www-form-urlencoded"
HOST_ORIGIN = "http://localhost"  # what the test client's requests say they are
BASE_ORIGIN = "https://news.example.com"  # [site] base_url of the test configuration
INJECTIONS = ["a\r\nBcc: x@y.z", "=?utf-8?q?hi=0ABcc:_x@y.z?="]

TRIED: Counter[str] = Counter()


def hostile_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


@pytest.fixture
def extra_config() -> str:
    return RATE_LIMIT_OFF


@pytest.fixture(scope="module", autouse=True)
def inputs_tried(request: pytest.FixtureRequest) -> Iterator[None]:
    """At the end of the module: how many hostile inputs each route and command received."""
    started = time.monotonic()
    yield
    lines = [f"{sum(TRIED.values())} hostile inputs tried in {time.monotonic() - started:.0f} s:"]
    lines += [f"  {count:>6}  {name}" for name, count in sorted(TRIED.items())]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print("\n".join(lines))
        return
    with capture.global_and_fixture_disabled():  # shown with or without -s
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


# ---- strategies -----------------------------------------------------------------------------------

NAME_OF_AN_EXCEPTION = re.compile(
    r"Traceback|\b[A-Z][A-Za-z]*(?:Error|Exception)\b|\bKeyboardInterrupt\b"
    r"|File \"[^\"]*\", line \d+"
)

PIECES = [
    "\x00",
    "\r",
    "\n",
    "\r\n",
    "\t",
    "\x0b",
    "\x0c",
    "\x1b",
    "\x7f",
    "\x85",
    "\u2028",
    "\u202e",
    "\u200b",
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    " ",
    "\u00a0",
    "%",
    "%00",
    "%0D%0A",
    "%FF",
    "%",
    "&",
    "=",
    ";",
    "+",
    "<",
    ">",
    '"',
    "'",
    "\\",
    "@",
    "@@",
    ".",
    "..",
    "/",
    "?",
    "#",
    ",",
    ":",
    "[",
    "]",
    "(",
    ")",
    "é",
    "ß",
    "日本",
    "😀",
    "xn--",
    "=?utf-8?q?",
    "?=",
    "Bcc: x@y.z",
    "<script>",
    "{{7*7}}",
    "%s",
    "${x}",
    "'--",
    "reader",
    "example.com",
    "localhost",
    "[127.0.0.1]",
    '"quoted local"',
    "a" * 64,
    "b" * 300,
]


def _no_exception_names(text: str) -> bool:
    return not NAME_OF_AN_EXCEPTION.search(text)


def hostile_text(max_size: int = 60) -> st.SearchStrategy[str]:
    """Random text, text built from dangerous pieces, and very long runs of one character."""
    return st.one_of(
        st.text(max_size=max_size),
        st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=4)), max_size=12).map("".join),
        st.builds(
            lambda c, n: c * n,
            st.sampled_from(["a", "x.", "\x00", "é", "@", "\r\n", " ", "😀"]),
            st.integers(250, 5000),
        ),
    ).filter(_no_exception_names)


LOCAL = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,20}", fullmatch=True)
DOMAINS = [
    "example.com",
    "Example.COM",
    "mail.example.org",
    "harbour-notes.example",
    "bücher.example",
    "xn--bcher-kva.example",
    "sub.domain.example.net",
]


@st.composite
def addresses(draw: st.DrawFn) -> str:
    """Well-formed addresses, the same with something hostile spliced in, and random text."""
    well_formed = f"{draw(LOCAL)}@{draw(st.sampled_from(DOMAINS))}"
    kind = draw(st.sampled_from(["well-formed", "spliced", "spliced", "hostile", "padded", "generated"]))
    if kind == "well-formed":
        return well_formed
    if kind == "spliced":
        at = draw(st.integers(0, len(well_formed)))
        return well_formed[:at] + draw(hostile_text(20)) + well_formed[at:]
    if kind == "padded":
        return (
            draw(st.sampled_from([" ", "\t", "\n", "\u00a0", ""]))
            + well_formed
            + draw(st.sampled_from([" ", "\r\n", "\x00", "\u2028", ""]))
        )
    if kind == "generated":
        return draw(st.emails())
    return draw(hostile_text())


def well_formed(address: str) -> bool:
    """What a subscribe form must accept: one ASCII-domain-able address, at most 254 characters."""
    address = address.strip()
    if not address or len(address) > 254:
        return False
    try:
        validate_email(address, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError:
        return False
    return True


def key_of(address: str) -> str:
    return validate_email(address.strip(), check_deliverability=False, allow_smtputf8=False).normalized.lower()


def plainly_broken(address: str) -> bool:
    """Malformed by inspection, without asking an email library."""
    address = address.strip()
    return "@" not in address or bool(re.search(r"[\x00-\x1f\x7f]", address)) or len(address) > 254


HEADER_VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0xFF), min_size=1, max_size=80)
FIELD_NAMES = ["email", "website", "started", "name", "csrf_token", "List-Unsubscribe", "email[]", "EMAIL", ""]


@dataclass
class Spec:
    """One HTTP request, and what the app saw in its form if that is known."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    fields: list[tuple[str, str]] | None = None
    kind: str = ""
    token: str | None = None

    def __repr__(self) -> str:
        body = self.body if len(self.body) <= 300 else self.body[:300] + b"...(%d bytes)" % len(self.body)
        fields = repr(self.fields)
        fields = fields if len(fields) <= 600 else fields[:600] + "..."
        return f"Spec({self.method} {self.path!r} {self.headers!r} body={body!r} fields={fields})"

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        printer.text(repr(self))


def urlencoded_fields(body: bytes) -> list[tuple[str, str]]:
    """The form werkzeug reads from an urlencoded BODY (a body that is not UTF-8 is no form at all)."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return []
    return parse_qsl(text, keep_blank_values=True, errors="werkzeug.url_quote")


def multipart(pairs: list[tuple[str, str]], boundary: str) -> bytes:
    """PAIRS as multipart/form-data (field names are kept to what a quoted header parameter can carry)."""
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value.encode() + b"\r\n"
        for name, value in pairs
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def multipart_name(name: str) -> str:
    return re.sub(r'[\x00-\x1f\x7f"\\%]', "", name) or "field"


@st.composite
def form_pairs(draw: st.DrawFn) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    if draw(st.integers(0, 9)) > 0:
        pairs.append(("email", draw(addresses())))
    if draw(st.booleans()):
        pairs.append(("website", draw(st.one_of(st.just(""), hostile_text(30)))))
    if draw(st.integers(0, 4)) == 0:
        pairs.append(("started", draw(st.one_of(st.just(""), st.just("form.AAAAAA.forged"), hostile_text(30)))))
    for _ in range(draw(st.integers(0, 3))):
        pairs.append((draw(st.one_of(st.sampled_from(FIELD_NAMES), hostile_text(10))), draw(hostile_text(40))))
    return draw(st.permutations(pairs))


OTHER_TYPES = [
    "application/json",
    "text/plain",
    "text/html",
    "application/xml",
    "application/octet-stream",
    "multipart/mixed; boundary=x",
    "multipart/form-data",
    "multipart/form-data; boundary=",
    "image/png",
    "x/y",
    ";;;",
    "application/x-www-form-urlencoded-not",
    "form",
]


@st.composite
def subscribe_requests(draw: st.DrawFn) -> Spec:
    """POST /subscribe in every shape: forms, raw bytes, multipart, other types, far too big."""
    kind = draw(st.sampled_from(["form"] * 4 + ["raw"] * 2 + ["multipart", "multipart-raw", "other-type", "huge"]))
    headers: dict[str, str] = {}
    fetch_site = draw(
        st.one_of(
            st.none(),
            st.none(),
            st.none(),
            st.sampled_from(["same-origin", "same-site", "cross-site", "none", "SAME-ORIGIN"]),
            HEADER_VALUE,
        )
    )
    if fetch_site is not None:
        headers["Sec-Fetch-Site"] = fetch_site
    origin = draw(
        st.one_of(
            st.none(),
            st.none(),
            st.none(),
            st.sampled_from(
                [
                    BASE_ORIGIN,
                    BASE_ORIGIN + "/",
                    "null",
                    "https://evil.example",
                    "https://news.example.com.evil.example",
                ]
            ),
            HEADER_VALUE,
        )
    )
    if origin is not None:
        headers["Origin"] = origin
    if draw(st.booleans()):
        headers["User-Agent"] = draw(st.one_of(HEADER_VALUE, st.builds(lambda n: "U" * n, st.integers(500, 4000))))
    fields: list[tuple[str, str]] | None
    if kind == "form":
        fields = draw(form_pairs())
        body = urlencode(fields).encode()
        content_type = draw(
            st.sampled_from(
                [FORM, FORM + "; charset=utf-8", FORM + "; charset=latin-1", "APPLICATION/X-WWW-FORM-URLENCODED"]
            )
        )
    elif kind == "raw":
        body = draw(
            st.one_of(
                st.binary(max_size=600),
                st.builds(
                    lambda a, b: b"email=" + a + b,
                    st.binary(max_size=80),
                    st.sampled_from(
                        [
                            b"",
                            b"@example.com",
                            b"%FF@example.com",
                            b"\xff@example.com",
                            b"%0D%0ABcc:%20x@y.z",
                            b"%00",
                            b"&website=",
                            b"&started=",
                            b"&email=second@example.com",
                        ]
                    ),
                ),
                st.builds(lambda s: s.encode("utf-8", "surrogatepass"), hostile_text(80)),
            )
        )
        fields = urlencoded_fields(body)
        content_type = FORM
    elif kind == "multipart":
        fields = [(multipart_name(name), value) for name, value in draw(form_pairs())]
        boundary = secrets.token_hex(12)
        body = multipart(fields, boundary)
        content_type = f"multipart/form-data; boundary={boundary}"
    elif kind == "multipart-raw":
        boundary = draw(st.sampled_from(["x", "----b", secrets.token_hex(4)]))
        body = draw(
            st.one_of(
                st.binary(max_size=600),
                st.builds(
                    lambda raw: (
                        f'--{boundary}\r\nContent-Disposition: form-data; name="email"\r\n\r\n'.encode()
                        + raw
                        + f"\r\n--{boundary}--\r\n".encode()
                    ),
                    st.binary(max_size=120),
                ),
                st.builds(
                    lambda raw: (
                        f'--{boundary}\r\nContent-Disposition: form-data; name="email"; '
                        f'filename="a.txt"\r\nContent-Type: text/plain\r\n\r\n'.encode()
                        + raw
                        + f"\r\n--{boundary}--\r\n".encode()
                    ),
                    st.binary(max_size=120),
                ),
            )
        )
        fields = None
        content_type = f"multipart/form-data; boundary={boundary}"
    elif kind == "other-type":
        content_type = draw(st.one_of(st.sampled_from(OTHER_TYPES), HEADER_VALUE))
        pairs = draw(form_pairs())
        body = draw(
            st.sampled_from(
                [
                    urlencode(pairs).encode(),
                    json.dumps(dict(pairs)).encode(),
                    "\n".join(f"{k}={v}" for k, v in pairs).encode(),
                ]
            )
        )
        mimetype = parse_options_header(content_type)[0]
        fields = [] if mimetype not in (FORM, "multipart/form-data") else None
    else:
        size = draw(st.integers(MAX_CONTENT_LENGTH + 1, 4 * MAX_CONTENT_LENGTH))
        filler = draw(st.sampled_from([b"x", b"\x00", b"\xff", b"%", b"&"]))
        body = b"email=reader%40example.com&pad=" + filler * size
        fields = None
        content_type = draw(st.sampled_from([FORM, "multipart/form-data; boundary=x", "text/plain"]))
    headers["Content-Type"] = content_type
    return Spec("POST", "/subscribe", headers, body, fields, kind)


# ---- sending requests and judging replies ---------------------------------------------------------


@dataclass
class Reply:
    status: int
    text: str
    headers: dict[str, str]


Send = Callable[[Spec], Reply]


def client_sender(app) -> Send:
    client = app.test_client()

    def send(spec: Spec) -> Reply:
        response = client.open(spec.path, method=spec.method, headers=spec.headers, data=spec.body)
        return Reply(response.status_code, response.get_data().decode("utf-8", "replace"), dict(response.headers))

    return send


def http_sender(base: str) -> Send:
    def send(spec: Spec) -> Reply:
        headers = {name: value.encode("latin-1") for name, value in spec.headers.items()}
        response = requests.request(
            spec.method, base + spec.path, headers=headers, data=spec.body, timeout=20, allow_redirects=False
        )
        return Reply(response.status_code, response.content.decode("utf-8", "replace"), dict(response.headers))

    return send


@dataclass(frozen=True)
class Snapshot:
    subscribers: tuple[tuple[int, str, str], ...]
    outbox: int
    signups: tuple[tuple[int, str], ...]  # the sign-up log the form adds to: (id, address as the key compares it)


def snapshot(nl) -> Snapshot:
    with nl.sessions() as session:
        rows = session.execute(
            select(Subscriber.id, Subscriber.email_key, Subscriber.status).order_by(Subscriber.id)
        ).all()
        outbox = session.scalar(select(func.count()).select_from(OutboxMessage))
        signups = session.execute(select(Signup.id, Signup.email).order_by(Signup.id)).all()
    return Snapshot(tuple((i, k, s.value) for i, k, s in rows), outbox, tuple((i, e.lower()) for i, e in signups))


def assert_clean_page(reply: Reply, *echoed: str) -> None:
    """Never a server error, never a traceback or the name of a Python exception in what the visitor reads."""
    assert reply.status < 500, (reply.status, reply.text[:2000])
    text = reply.text
    for value in echoed:
        text = text.replace(str(escape(value)), "")
    assert not NAME_OF_AN_EXCEPTION.search(text), (reply.status, text[:2000])


def judge_subscribe(
    nl,
    spec: Spec,
    reply: Reply,
    before: Snapshot,
    self_origin: str = HOST_ORIGIN,
) -> None:
    """The subscribe form's promises, for any request that reached POST /subscribe."""
    form = spec.fields or []
    address = next((value for name, value in form if name == "email"), "")
    assert_clean_page(reply, address[:320], *(value for _, value in form))
    after = snapshot(nl)
    if reply.status != 200:
        assert after == before, (spec.kind, reply.status)
    if reply.text.endswith(f"(generated by {WAITRESS_OPTIONS['ident']})"):
        assert reply.status == 400  # waitress refused the request itself (a DEL in a header): the app never saw it
        return
    origin = spec.headers.get("Origin")
    same_origin = spec.headers.get("Sec-Fetch-Site") == "same-origin"  # the browser vouches for our own page
    if origin is not None and origin.rstrip("/") not in (BASE_ORIGIN, self_origin) and not same_origin:
        assert reply.status == 403  # checked before the body is read
        return
    if len(spec.body) > MAX_CONTENT_LENGTH:
        assert reply.status == 413 and "Too much data" in reply.text
        return
    if spec.fields is None:  # a body whose parse is left to werkzeug: only the general promises
        assert reply.status in (200, 400), reply.status
        new = set(after.signups) - set(before.signups)
        assert len(new) <= 1 and all(well_formed(key) for _, key in new)
        return
    names = [name for name, _ in form]
    if "email" not in names:
        assert reply.status == 400 and 'class="error"' in reply.text
        return
    website = next((value for name, value in form if name == "website"), "")
    from_another_site = spec.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site") or (
        origin not in (None, "null") and origin.rstrip("/") not in (BASE_ORIGIN, self_origin)
    )
    if not well_formed(address):
        assert reply.status == 400, (address, reply.status)  # however fast it came, with the reason
        assert 'class="error"' in reply.text and 'name="email"' in reply.text
    elif website or "started" in names or not from_another_site:
        # a bot, or a person whose browser was too quick: asked to press again, and nothing happens
        assert reply.status == 400 and "press Subscribe again" in reply.text, (spec.kind, reply.status)
        assert "Check your inbox" not in reply.text and after == before
    else:  # the blog's embedded form, which carries no timestamp
        assert reply.status == 200 and "Check your inbox" in reply.text, (address, reply.status)
        assert key_of(address) in {key for _, key in after.signups}
        assert len(after.signups) - len(before.signups) == 1
    if plainly_broken(address):
        assert reply.status == 400


# ---- POST /subscribe ------------------------------------------------------------------------------


@hostile_settings(450)
@given(spec=subscribe_requests())
def test_subscribe_answers_every_shape_of_form_cleanly(app, nl, spec: Spec) -> None:
    send = client_sender(app)
    before = snapshot(nl)
    reply = send(spec)
    TRIED["POST /subscribe (test client)"] += 1
    judge_subscribe(nl, spec, reply, before)


def test_a_malformed_address_is_refused_with_the_reason(app, nl) -> None:
    send = client_sender(app)
    for address in [
        "",
        "no-at-sign",
        "a@b",
        "reader@example.com\r\nBcc: x@y.z",
        "reader@exa\x00mple.com",
        "=?utf-8?q?hi=0ABcc:_x@y.z?=",
        "x" * 300 + "@example.com",
        "reader@example.com\x00",
    ]:
        spec = Spec(
            "POST",
            "/subscribe",
            {"Content-Type": FORM},
            urlencode({"email": address}).encode(),
            [("email", address)],
            "form",
        )
        before = snapshot(nl)
        reply = send(spec)
        TRIED["POST /subscribe (test client)"] += 1
        assert reply.status == 400 and 'class="error"' in reply.text
        judge_subscribe(nl, spec, reply, before)


# ---- methods and paths ----------------------------------------------------------------------------

# The methods each route serves; OPTIONS is answered for every route (200 and an Allow header), nothing else is.
ROUTES = {
    "/": {"GET", "HEAD"},
    "/subscribe": {"POST"},
    "/healthz": {"GET", "HEAD"},
    "/style.css": {"GET", "HEAD"},
    "/confirm/{confirm}": {"GET", "HEAD", "POST"},
    "/unsubscribe/{unsubscribe}": {"GET", "HEAD", "POST"},
    "/confirm/not-a-token": {"GET", "HEAD", "POST"},
    "/unsubscribe/not-a-token": {"GET", "HEAD", "POST"},
}
WRONG_METHODS = ["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND", "MKCOL", "FOO", "GET", "POST"]


@dataclass
class Readers:
    """A pending sign-up and a confirmed reader, with the real tokens of their links."""

    pending_id: int
    confirm: str
    confirmed_id: int
    unsubscribe: str


def make_readers(nl) -> Readers:
    with nl.sessions.begin() as session:
        pending, _ = add(session, "pending@example.com", False, Requester.admin())
        pending.confirm_nonce = secrets.token_urlsafe(12)
        kept, _ = add(session, "kept@example.com", True, Requester.admin())
        session.flush()
        ids = pending.id, pending.confirm_nonce, kept.id
    return Readers(ids[0], nl.tokens.confirm_token(ids[0], ids[1]), ids[2], nl.tokens.unsubscribe_token(ids[2]))


@st.composite
def wrong_method_requests(draw: st.DrawFn, readers: Readers) -> Spec:
    route = draw(st.sampled_from(sorted(ROUTES)))
    allowed = ROUTES[route]
    method = draw(st.sampled_from([m for m in WRONG_METHODS if m not in allowed]))
    path = route.format(confirm=readers.confirm, unsubscribe=readers.unsubscribe)
    body = draw(
        st.one_of(st.just(b""), st.binary(max_size=300), st.builds(lambda p: urlencode(p).encode(), form_pairs()))
    )
    headers = {
        "Content-Type": draw(
            st.sampled_from([FORM, "application/json", "text/plain", "multipart/form-data; boundary=x"])
        )
    }
    if draw(st.booleans()):
        body += b"&List-Unsubscribe=One-Click"
    return Spec(method, path, headers, body, kind="wrong-method")


@hostile_settings(150)
@given(data=st.data())
def test_wrong_methods_get_405_and_change_nothing(app, nl, data: st.DataObject) -> None:
    readers = cached_readers(nl)
    spec = data.draw(wrong_method_requests(readers))
    send = client_sender(app)
    before = snapshot(nl)
    reply = send(spec)
    TRIED["wrong methods on every route (test client)"] += 1
    assert_clean_page(reply)
    assert snapshot(nl) == before
    if spec.method == "OPTIONS":
        assert reply.status == 200 and "Allow" in reply.headers
    else:
        assert reply.status == 405, (spec.method, spec.path, reply.status)
        assert "Allow" in reply.headers


_READERS: dict[str, Readers] = {}


def cached_readers(nl) -> Readers:
    """The readers of this test's database, made on the first example (each test has its own secret key)."""
    key = nl.config.security.secret_key
    if key not in _READERS:
        _READERS.clear()
        _READERS[key] = make_readers(nl)
    return _READERS[key]


SEGMENT = st.one_of(
    hostile_text(30),
    st.sampled_from(
        [
            "",
            ".",
            "..",
            "confirm",
            "unsubscribe",
            "subscribe",
            "healthz",
            "style.css",
            "demo",
            "static",
            "%2e%2e",
            "%2F",
            "%00",
            "index.php",
            "wp-login.php",
        ]
    ),
)


@st.composite
def random_paths(draw: st.DrawFn) -> str:
    segments = draw(st.lists(SEGMENT, min_size=1, max_size=6))
    segments[0] = segments[0] or "x"  # "//host/..." would name a host, not a path
    if draw(st.booleans()):
        return "/" + "/".join(quote(s, safe="") for s in segments)
    return "/" + "/".join(quote(s, safe="/%.:@!$&'()*+,;=~") for s in segments)


@hostile_settings(200)
@given(
    path=random_paths(),
    method=st.sampled_from(["GET", "POST", "HEAD", "GET"]),
    body=st.one_of(st.just(b""), st.binary(max_size=200)),
)
def test_random_paths_are_a_clean_404_or_a_real_page(
    app,
    nl,
    path: str,
    method: str,
    body: bytes,
) -> None:
    send = client_sender(app)
    before = snapshot(nl)
    reply = send(Spec(method, path, {"Content-Type": FORM}, body))
    TRIED["random paths (test client)"] += 1
    assert_clean_page(reply)
    assert reply.status in (200, 308, 400, 404, 405), (path, reply.status)
    if reply.status != 200 or method != "POST":
        assert snapshot(nl) == before


GET_PAGES = {
    "/": 200,
    "/healthz": 200,
    "/style.css": 200,
    "/confirm/{confirm}": 200,
    "/unsubscribe/{unsubscribe}": 200,
    "/confirm/not-a-token": 400,
    "/unsubscribe/not-a-token": 400,
}
HEADER_SAFE = hostile_text(60).map(lambda s: re.sub(r"[\r\n]", "", s))


@st.composite
def query_strings(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return urlencode(draw(st.lists(st.tuples(hostile_text(10), hostile_text(40)), max_size=4)))
    return quote(draw(hostile_text(80)), safe="=&;%+")


@pytest.mark.filterwarnings("ignore:The 'session' cookie is too large")
@hostile_settings(150)
@given(data=st.data())
def test_hostile_query_strings_headers_and_cookies(app, nl, data: st.DataObject) -> None:
    """Every page, and the confirmation button, with junk in the query string, the headers and the session cookie."""
    readers = cached_readers(nl)
    route = data.draw(st.sampled_from(sorted(GET_PAGES)))
    path = route.format(confirm=readers.confirm, unsubscribe=readers.unsubscribe)
    query = data.draw(query_strings())
    headers = {
        name: data.draw(HEADER_SAFE)
        for name in data.draw(
            st.lists(
                st.sampled_from(
                    [
                        "Accept-Language",
                        "Accept",
                        "If-None-Match",
                        "If-Modified-Since",
                        "Range",
                        "Referer",
                        "X-Forwarded-For",
                        "X-Forwarded-Proto",
                        "User-Agent",
                        "Accept-Encoding",
                    ]
                ),
                max_size=4,
                unique=True,
            )
        )
    }
    client = app.test_client()
    client.set_cookie("session", data.draw(st.one_of(HEADER_SAFE, st.just("eyJjc3JmX3Rva2VuIjoiYSJ9.x.y"))))
    before = snapshot(nl)
    press = route.startswith("/confirm/") and data.draw(st.booleans())
    if press:  # a button pressed with a forged or missing CSRF token changes nothing
        form = {"csrf_token": data.draw(hostile_text(60))} if data.draw(st.booleans()) else {}
        response = client.post(f"{path}?{query}", data=form, headers=headers)
    else:
        response = client.open(f"{path}?{query}", method=data.draw(st.sampled_from(["GET", "HEAD"])), headers=headers)
    TRIED["every page with hostile query strings, headers, cookies (test client)"] += 1
    reply = Reply(response.status_code, response.get_data().decode("utf-8", "replace"), dict(response.headers))
    assert_clean_page(reply, query)
    assert reply.status == (400 if press else GET_PAGES[route]), (route, reply.status)
    assert snapshot(nl) == before


# ---- confirmation and unsubscribe tokens -----------------------------------------------------------

TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."


@st.composite
def damaged(draw: st.DrawFn, token: str, others: list[str]) -> str:
    """A real token cut short, with one character changed, added or taken away, or something else."""
    kind = draw(
        st.sampled_from(
            [
                "cut",
                "cut",
                "change",
                "change",
                "change",
                "insert",
                "delete",
                "swap",
                "append",
                "other",
                "hostile",
                "case",
            ]
        )
    )
    i = draw(st.integers(0, len(token) - 1))
    if kind == "cut":
        return token[:i]
    if kind == "change":
        return (
            token[:i]
            + draw(st.sampled_from(TOKEN_CHARS + "~!*'()%\x00 é/").filter(lambda c: c != token[i]))
            + token[i + 1 :]
        )
    if kind == "insert":
        return token[:i] + draw(st.sampled_from(TOKEN_CHARS + "~=\x00\n")) + token[i:]
    if kind == "delete":
        return token[:i] + token[i + 1 :]
    if kind == "swap":
        j = draw(st.integers(0, len(token) - 1))
        chars = list(token)
        chars[i], chars[j] = chars[j], chars[i]
        return "".join(chars)
    if kind == "append":
        return token + draw(hostile_text(20))
    if kind == "other":
        return draw(st.sampled_from(others))
    if kind == "case":
        return token.swapcase()
    return draw(hostile_text(80))


def same_claim(load: Callable[[str], object], original: str, candidate: str) -> bool:
    """Whether itsdangerous, with the site's key, reads CANDIDATE as the same claim as ORIGINAL."""
    try:
        return load(candidate) == load(original)
    except Exception:
        return False


def loader(nl, route: str) -> Callable[[str], object]:
    """itsdangerous, with the site's key and the salt of ROUTE: what a token really says."""
    secret = nl.config.security.secret_key
    if route == "confirm":
        return lambda token: URLSafeTimedSerializer([secret], salt=CONFIRM_SALT).loads(token, max_age=3600)
    return URLSafeSerializer([secret], salt=UNSUBSCRIBE_SALT).loads


def token_path(route: str, token: str) -> str:
    return f"/{route}/" + quote(token, safe="")


def accepted(reply: Reply, token: str) -> bool:
    """The page for a token that says the same as the real one: base64 ignores its padding bits and reads "/" as
    "_", so a few one-character changes are other spellings of it (one with a slash cannot reach the route)."""
    return reply.status == 200 or (reply.status in (404, 308) and "/" in token)


def refused(reply: Reply, token: str) -> bool:
    """The "this link does not work" page; or, for a token with a slash in it, no such page (or a redirect to
    the path with the doubled slash merged, which is then refused in turn)."""
    if reply.status == 400 and "This" in reply.text and "link" in reply.text:
        return True
    return reply.status in (404, 308) and ("/" in token or token in ("", ".", ".."))


@hostile_settings(220)
@given(data=st.data())
def test_damaged_confirmation_tokens_are_refused(app, nl, data: st.DataObject) -> None:
    readers = cached_readers(nl)
    load = loader(nl, "confirm")
    wrong_key = URLSafeTimedSerializer(["guessed"], salt=CONFIRM_SALT).dumps([readers.pending_id, "n"])
    token = data.draw(damaged(readers.confirm, [readers.unsubscribe, wrong_key, "not-a-token"]))
    assume(token != readers.confirm)
    client = app.test_client()
    page = client.get(token_path("confirm", readers.confirm))
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True)).group(1)
    before = snapshot(nl)
    shown = client.get(token_path("confirm", token))
    TRIED["GET /confirm/<token> (test client)"] += 1
    shown_reply = Reply(shown.status_code, shown.get_data().decode("utf-8", "replace"), dict(shown.headers))
    assert_clean_page(shown_reply, token)
    if same_claim(load, readers.confirm, token):  # another spelling of the same token; pressing it would confirm
        assert accepted(shown_reply, token), (token, shown.status_code)
        return
    assert refused(shown_reply, token), (token, shown.status_code)
    for body in ({"csrf_token": csrf}, {}, {"csrf_token": csrf, "List-Unsubscribe": "One-Click"}):
        pressed = client.post(token_path("confirm", token), data=body)
        TRIED["POST /confirm/<token> (test client)"] += 1
        reply = Reply(pressed.status_code, pressed.get_data().decode("utf-8", "replace"), dict(pressed.headers))
        assert_clean_page(reply, token)
        assert reply.status in (400, 404, 308), (token, reply.status)
    assert snapshot(nl) == before


@hostile_settings(220)
@given(data=st.data())
def test_damaged_unsubscribe_tokens_are_refused(app, nl, data: st.DataObject) -> None:
    readers = cached_readers(nl)
    load = loader(nl, "unsubscribe")
    wrong_key = URLSafeSerializer(["guessed"], salt=UNSUBSCRIBE_SALT).dumps(readers.confirmed_id)
    token = data.draw(damaged(readers.unsubscribe, [readers.confirm, wrong_key, "not-a-token"]))
    assume(token != readers.unsubscribe)
    client = app.test_client()
    before = snapshot(nl)
    shown = client.get(token_path("unsubscribe", token))
    TRIED["GET /unsubscribe/<token> (test client)"] += 1
    shown_reply = Reply(shown.status_code, shown.get_data().decode("utf-8", "replace"), dict(shown.headers))
    assert_clean_page(shown_reply, token)
    if same_claim(load, readers.unsubscribe, token):
        assert accepted(shown_reply, token), (token, shown.status_code)
        return
    assert refused(shown_reply, token), (token, shown.status_code)
    encoding = data.draw(st.sampled_from(["urlencoded", "multipart", "raw", "json"]))
    if encoding == "urlencoded":
        pressed = client.post(token_path("unsubscribe", token), data={"List-Unsubscribe": "One-Click"})
    elif encoding == "multipart":
        pressed = client.post(
            token_path("unsubscribe", token), data={"List-Unsubscribe": "One-Click"}, content_type="multipart/form-data"
        )
    elif encoding == "raw":
        pressed = client.post(
            token_path("unsubscribe", token),
            content_type=FORM,
            data=b"List-Unsubscribe=One-Click&" + data.draw(st.binary(max_size=100)),
        )
    else:
        pressed = client.post(token_path("unsubscribe", token), json={"List-Unsubscribe": "One-Click"})
    TRIED["POST /unsubscribe/<token> (test client)"] += 1
    reply = Reply(pressed.status_code, pressed.get_data().decode("utf-8", "replace"), dict(pressed.headers))
    assert_clean_page(reply, token)
    assert reply.status in (400, 404, 308), (token, reply.status)
    assert snapshot(nl) == before


def test_the_undamaged_tokens_work(app, nl) -> None:
    """The checks above are not vacuous: the undamaged tokens open their pages and one-click works."""
    readers = make_readers(nl)
    client = app.test_client()
    assert client.get(token_path("confirm", readers.confirm)).status_code == 200
    assert client.get(token_path("unsubscribe", readers.unsubscribe)).status_code == 200
    assert (
        client.post(token_path("unsubscribe", readers.unsubscribe), data={"List-Unsubscribe": "One-Click"}).status_code
        == 200
    )
    with nl.sessions() as session:
        assert session.get(Subscriber, readers.confirmed_id).status == Status.UNSUBSCRIBED


# ---- over real HTTP -------------------------------------------------------------------------------


@st.composite
def any_request(draw: st.DrawFn, readers: Readers) -> Spec:
    kind = draw(st.sampled_from(["subscribe"] * 4 + ["wrong-method", "path", "confirm", "unsubscribe"]))
    if kind == "subscribe":
        return draw(subscribe_requests())
    if kind == "wrong-method":
        return draw(wrong_method_requests(readers))
    if kind == "path":
        return Spec(
            draw(st.sampled_from(["GET", "POST", "HEAD"])),
            draw(random_paths()),
            {"Content-Type": FORM},
            draw(st.binary(max_size=100)),
            kind="path",
        )
    route, token = ("confirm", readers.confirm) if kind == "confirm" else ("unsubscribe", readers.unsubscribe)
    bad = draw(damaged(token, ["not-a-token"]))
    return Spec(
        draw(st.sampled_from(["GET", "POST"])),
        token_path(route, bad),
        {"Content-Type": FORM},
        b"List-Unsubscribe=One-Click",
        kind=kind,
        token=bad,
    )


REAL_HTTP_LABELS = {
    "subscribe": "POST /subscribe (real HTTP)",
    "path": "random paths (real HTTP)",
    "confirm": "GET/POST /confirm/<token> (real HTTP)",
    "unsubscribe": "GET/POST /unsubscribe/<token> (real HTTP)",
    "wrong-method": "wrong methods on every route (real HTTP)",
}


@hostile_settings(260)
@given(data=st.data())
def test_everything_over_real_http(site, data: st.DataObject) -> None:
    readers = cached_readers(site.nl)
    spec = data.draw(any_request(readers))
    if spec.kind in ("confirm", "unsubscribe"):
        original = readers.confirm if spec.kind == "confirm" else readers.unsubscribe
        assume(spec.token != original and not same_claim(loader(site.nl, spec.kind), original, spec.token))
    before = snapshot(site.nl)
    reply = http_sender(site.base)(spec)
    TRIED[REAL_HTTP_LABELS[spec.kind if spec.kind in REAL_HTTP_LABELS else "subscribe"]] += 1
    if spec.kind in ("confirm", "unsubscribe"):
        assert_clean_page(reply, spec.token or "")
        assert reply.status in (400, 404, 308), (spec.path, reply.status)
        assert snapshot(site.nl) == before
    elif spec.path == "/subscribe" and spec.method == "POST":
        judge_subscribe(site.nl, spec, reply, before, site.base)
    else:
        assert_clean_page(reply)
        assert snapshot(site.nl) == before
        if spec.kind == "wrong-method":
            assert reply.status == (200 if spec.method == "OPTIONS" else 405), (spec.method, spec.path, reply.status)
        else:
            assert reply.status in (200, 308, 400, 404, 405), (spec.path, reply.status)


def test_every_route_with_every_wrong_method_over_real_http(site) -> None:
    readers = cached_readers(site.nl)
    before = snapshot(site.nl)
    for route, allowed in ROUTES.items():
        path = route.format(confirm=readers.confirm, unsubscribe=readers.unsubscribe)
        for method in ["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "GET", "POST"]:
            if method in allowed:
                continue
            response = requests.request(
                method, site.base + path, data=b"List-Unsubscribe=One-Click", timeout=10, headers={"Content-Type": FORM}
            )
            TRIED["wrong methods on every route (real HTTP)"] += 1
            assert_clean_page(Reply(response.status_code, response.text, dict(response.headers)))
            assert response.status_code == (200 if method == "OPTIONS" else 405), (method, route)
    assert snapshot(site.nl) == before


def raw_exchange(base: str, request: bytes, timeout: float = 15) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


RAW_BYTES = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [
            b"\x00",
            b"\r",
            b"\n",
            b"\r\n",
            b"\xff\xfe",
            b"%00",
            b"%0d%0a",
            b"%ff",
            b"..",
            b"/",
            b"?",
            b"#",
            b" ",
            b"\x7f",
            b"\xc3\x28",
            b"\xed\xa0\x80",
            b"\xf4\x90\x80\x80",
        ]
    ),
)


@st.composite
def raw_requests(draw: st.DrawFn, readers: Readers) -> tuple[bytes, str]:
    """Request bytes that no well-behaved client would send: raw bytes in the path and in headers."""
    target = draw(
        st.sampled_from(
            [
                b"/",
                b"/subscribe",
                b"/confirm/" + readers.confirm.encode(),
                b"/unsubscribe/" + readers.unsubscribe.encode(),
                b"/healthz",
                b"/confirm/",
            ]
        )
    )
    at = draw(st.integers(0, len(target)))
    target = target[:at] + draw(st.lists(RAW_BYTES, max_size=4).map(b"".join)) + target[at:]
    target = target.replace(b" ", b"%20").replace(b"\r", b"").replace(b"\n", b"") or b"/"
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD"]))
    headers = [b"Host: 127.0.0.1", b"Connection: close"]
    for _ in range(draw(st.integers(0, 3))):
        name = draw(
            st.sampled_from([b"User-Agent", b"Origin", b"Cookie", b"X-Forwarded-For", b"Accept-Language", b"Referer"])
        )
        headers.append(name + b": " + draw(RAW_BYTES.map(lambda b: b.replace(b"\r\n", b"\r"))))
    body = draw(
        st.one_of(
            st.just(b""), st.binary(max_size=300), st.builds(lambda raw: b"email=" + raw, st.binary(max_size=100))
        )
    )
    headers += [b"Content-Type: " + FORM.encode(), b"Content-Length: " + str(len(body)).encode()]
    return method + b" " + target + b" HTTP/1.1\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body, method.decode()


@hostile_settings(120)
@given(data=st.data())
def test_raw_bytes_on_the_wire(site, data: st.DataObject) -> None:
    readers = cached_readers(site.nl)
    request, method = data.draw(raw_requests(readers))
    before = snapshot(site.nl)
    started = time.monotonic()
    answer = raw_exchange(site.base, request)
    TRIED["raw request bytes (real HTTP)"] += 1
    assert time.monotonic() - started < 10, "the server took too long to answer"
    status_line = answer.split(b"\r\n", 1)[0]
    assert re.match(rb"HTTP/1\.[01] \d{3} ", status_line), answer[:300]
    status = int(status_line.split()[1])
    reply = Reply(status, answer.decode("utf-8", "replace"), {})
    assert_clean_page(reply)
    if status >= 400 or method != "POST":
        assert snapshot(site.nl) == before


@hostile_settings(40)
@given(
    size=st.integers(MAX_CONTENT_LENGTH + 1, 2 * 1024 * 1024),
    chunked=st.booleans(),
    content_type=st.sampled_from([FORM, "multipart/form-data; boundary=x", "text/plain"]),
)
def test_huge_bodies_over_real_http_get_413(site, size: int, chunked: bool, content_type: str) -> None:
    before = snapshot(site.nl)
    body = b"email=reader%40example.com&pad=" + b"x" * size
    payload = (body[i : i + 65536] for i in range(0, len(body), 65536)) if chunked else body
    response = requests.post(f"{site.base}/subscribe", data=payload, headers={"Content-Type": content_type}, timeout=30)
    TRIED["huge bodies to POST /subscribe (real HTTP)"] += 1
    assert response.status_code == 413, response.status_code
    assert_clean_page(Reply(response.status_code, response.text, {}))
    assert "Too much data" in response.text
    assert snapshot(site.nl) == before


@pytest.mark.parametrize("extra_config", ['[web]\nrate_limit = "4 per hour"\n'])
@hostile_settings(40)
@given(spec=subscribe_requests())
def test_over_the_rate_limit_everything_is_a_clean_429(site, spec: Spec) -> None:
    before = snapshot(site.nl)
    reply = http_sender(site.base)(spec)
    TRIED["POST /subscribe over the rate limit (real HTTP)"] += 1
    if reply.status == 429:
        assert_clean_page(reply)
        assert "Too many sign-ups" in reply.text and "try again later" in reply.text
        assert snapshot(site.nl) == before
    else:
        judge_subscribe(site.nl, spec, reply, before, site.base)


# ---- the command line -----------------------------------------------------------------------------

Invoke = Callable[..., Result]


@pytest.fixture
def invoke(config_file: Path, app) -> Invoke:
    """Run a command on the test's database; exceptions are caught, so a traceback is a finding, not a crash."""
    runner = CliRunner()

    def run(*args: str, config: Path | None = None) -> Result:
        return runner.invoke(cli, ["--config", str(config or config_file), *args], catch_exceptions=True)

    return run


def assert_clean_exit(result: Result) -> None:
    """Status 0, 1 or 2, no traceback, and a failure says what to fix in one line."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError("the command crashed:\n" + "".join(traceback.format_exception(*result.exc_info)))
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.output)
    assert "Traceback" not in result.output
    if result.exit_code != 0:
        lines = [line for line in terminal_lines(result.stderr) if line.strip()]
        errors = [line for line in lines if line.startswith("Error: ")]
        assert len(errors) == 1, result.stderr
        assert all(line.startswith(("Error: ", "Usage: ", "Try ")) for line in lines), result.stderr
        if not any(line.startswith("Usage: ") for line in lines):
            assert len(lines) == 1, result.stderr


def terminal_lines(text: str) -> list[str]:
    """Lines as a terminal shows them (str.splitlines also breaks at U+2028, U+0085 and friends)."""
    return re.split(r"\r?\n", text)


CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def count_rows(nl, model: type) -> int:
    with nl.sessions() as session:
        return session.scalar(select(func.count()).select_from(model))


ARGV_BYTES = st.binary(max_size=40).map(os.fsdecode)  # bytes in argv that are not UTF-8 arrive as lone surrogates
ARGV = st.one_of(addresses(), hostile_text(), ARGV_BYTES)


@hostile_settings(120)
@given(address=ARGV, confirmed=st.booleans(), separator=st.booleans())
def test_subscribers_add(invoke, nl, address: str, confirmed: bool, separator: bool) -> None:
    before = snapshot(nl)
    result = invoke(
        "subscribers", "add", *(["--confirmed"] if confirmed else []), *(["--"] if separator else []), address
    )
    TRIED["newsletter subscribers add"] += 1
    assert_clean_exit(result)
    after = snapshot(nl)
    if not separator and address.startswith("-"):
        assert after == before  # click reads it as an option (-h shows the help): nothing is added
    elif result.exit_code == 0:
        assert well_formed(address), address
        assert key_of(address) in {key for _, key, _ in after.subscribers}
        assert result.output.startswith(("added ", "already there: ")) and result.output.count("\n") == 1
    else:
        assert after == before
        if separator:
            assert result.exit_code == 1 and not well_formed(address), (address, result.output)


@hostile_settings(80)
@given(address=ARGV, known=st.booleans())
def test_subscribers_remove(invoke, nl, address: str, known: bool) -> None:
    if known and well_formed(address):
        invoke("subscribers", "add", "--", address)
    before = snapshot(nl)
    result = invoke("subscribers", "remove", "--", address)
    TRIED["newsletter subscribers remove"] += 1
    assert_clean_exit(result)
    after = snapshot(nl)
    if result.exit_code == 0:
        assert len(after.subscribers) == len(before.subscribers) - 1
        assert key_of(address) not in {key for _, key, _ in after.subscribers}
    else:
        assert after == before


TIMES = st.one_of(
    st.just(""),
    hostile_text(30),
    st.datetimes(timezones=st.sampled_from([None, *(timezone(timedelta(hours=h)) for h in (-12, -5, 0, 5, 14))])).map(
        lambda d: d.isoformat()
    ),
    st.sampled_from(["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", "2026-02-30T00:00:00"]),
)
CSV_COLUMNS = [
    "email",
    "status",
    "created_at",
    "subscribed_at",
    "subscribed_ip",
    "confirmed_at",
    "confirmed_ip",
    "unsubscribed_at",
    "unsubscribed_ip",
    "Email",
    " email ",
    "",
    "extra",
]


@st.composite
def csv_files(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["rows", "rows", "rows", "bytes", "spliced"]))
    if kind == "bytes":
        return draw(st.binary(max_size=800))
    columns = draw(st.lists(st.sampled_from(CSV_COLUMNS), min_size=1, max_size=6))
    if draw(st.integers(0, 4)) > 0 and "email" not in columns:
        columns.insert(0, "email")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=draw(st.sampled_from(["\n", "\r\n", "\r"])))
    writer.writerow(columns)
    values = {
        "email": addresses(),
        "status": st.one_of(st.sampled_from([s.value for s in Status] + ["", "CONFIRMED"]), hostile_text(20)),
        "subscribed_ip": hostile_text(80),
        "confirmed_ip": hostile_text(80),
        "unsubscribed_ip": hostile_text(80),
    }
    for _ in range(draw(st.integers(0, 8))):
        row = [draw(values.get(c.strip().lower(), TIMES if c.endswith("_at") else hostile_text(20))) for c in columns]
        writer.writerow(row[: draw(st.integers(0, len(row)))] if draw(st.integers(0, 5)) == 0 else row)
    data = out.getvalue().encode("utf-8")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    if kind == "spliced":
        at = draw(st.integers(0, len(data)))
        data = (
            data[:at]
            + draw(st.sampled_from([b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b'"', b"\r", b"\n,,"]))
            + data[at:]
        )
    return data


@hostile_settings(100)
@given(content=csv_files())
def test_subscribers_import(invoke, nl, tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "readers.csv"
    path.write_bytes(content)
    before = snapshot(nl)
    result = invoke("subscribers", "import", "--verbose", str(path))
    TRIED["newsletter subscribers import"] += 1
    assert_clean_exit(result)
    after = snapshot(nl)
    if result.exit_code == 0:
        imported = int(re.match(r"imported ([\d,]+); already there", result.output).group(1).replace(",", ""))
        assert len(after.subscribers) - len(before.subscribers) == imported
        assert all(well_formed(email) for _, email, _ in set(after.subscribers) - set(before.subscribers))
        assert all(line.startswith("  line ") for line in terminal_lines(result.output)[1:-1]), result.output
        with nl.sessions() as session:
            ips = session.execute(
                select(Subscriber.subscribed_ip, Subscriber.confirmed_ip, Subscriber.unsubscribed_ip)
            ).all()
        assert not any("\x00" in (ip or "") for row in ips for ip in row)
    else:
        assert after == before


URLS = st.one_of(
    st.builds(lambda rest: "https://blog.example/" + rest, hostile_text(40)),
    st.builds(lambda rest: "http://" + rest, hostile_text(40)),
    hostile_text(40),
    st.sampled_from(["javascript:alert(1)", "https://", "ftp://x/", "https://blog.example/\r\nBcc: x@y.z"]),
    st.builds(lambda raw: "https://blog.example/" + os.fsdecode(raw), st.binary(max_size=20)),
)


@hostile_settings(100)
@given(
    title=st.one_of(hostile_text(), ARGV_BYTES),
    url=URLS,
    summary=st.one_of(
        st.just(""),
        hostile_text(200),
        ARGV_BYTES,
        st.sampled_from(
            ["<script>alert(1)</script>", '<a href="javascript:x">y</a>', "<p>ok</p>", "<![CDATA[", "<" * 500]
        ),
    ),
)
def test_posts_add(invoke, nl, title: str, url: str, summary: str) -> None:
    before = count_rows(nl, Post)
    result = invoke("posts", "add", "--title", title, "--url", url, "--summary", summary)
    TRIED["newsletter posts add"] += 1
    assert_clean_exit(result)
    if result.exit_code == 0:
        assert count_rows(nl, Post) == before + 1
        assert url.startswith(("https://", "http://")) and result.output.count("\n") == 1
        with nl.sessions() as session:
            post = session.scalars(select(Post).order_by(Post.id.desc()).limit(1)).one()
        assert not CONTROL.search(post.title) and "=?" not in post.title
        assert not CONTROL.search(post.url) and len(post.url) <= 2048
        assert "<script" not in post.summary_html and "javascript:" not in post.summary_html
        assert "\x00" not in post.summary_html
    else:
        assert count_rows(nl, Post) == before


@pytest.fixture
def a_post(invoke) -> None:
    assert invoke("posts", "add", "--title", "Ice on the quay", "--url", "https://blog.example/ice/").exit_code == 0


@hostile_settings(80)
@given(address=ARGV, dry_run=st.booleans())
def test_send_to(invoke, nl, smtp, a_post, address: str, dry_run: bool) -> None:
    smtp.clear()
    before = snapshot(nl)
    result = invoke("send", "--to", address, *(["--dry-run"] if dry_run else []))
    TRIED["newsletter send --to"] += 1
    assert_clean_exit(result)
    assert snapshot(nl) == before  # a test copy records nothing
    if result.exit_code == 0:
        assert well_formed(address)
        if not dry_run:
            [message] = smtp.messages
            validated = validate_email(address.strip(), check_deliverability=False, allow_smtputf8=False)
            assert [r.lower() for r in message.recipients] == [(validated.ascii_email or validated.normalized).lower()]
            assert message.message["Bcc"] is None
    else:
        assert smtp.messages == []
        if not address.startswith("-"):
            assert not well_formed(address)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


CONFIG_KEYS = {
    "site": ["name", "base_url", "feed_url", "templates_dir"],
    "security": ["secret_key", "secret_key_fallbacks", "confirm_max_age_hours"],
    "smtp": ["host", "port", "security", "username", "password", "from", "timeout", "connections", "batch_size"],
    "web": ["trusted_proxies", "rate_limit", "embed_origins", "min_fill_seconds", "signup_ceiling"],
    "dkim": ["selector", "domain", "private_key_file"],
    "nonsense": ["x"],
}
CONFIG_VALUES = st.one_of(
    hostile_text(40),
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
    st.floats(allow_nan=False),
    st.lists(hostile_text(10), max_size=3),
    st.sampled_from(
        [
            "10 per hour",
            "5/minute; 20/day",
            "none",
            "tls",
            "starttls",
            "0",
            "https://news.example.com",
            "Blog <news@example.com>",
            "a@b.example",
        ]
    ),
)


@st.composite
def config_files(draw: st.DrawFn, database_url: str) -> bytes:
    kind = draw(st.sampled_from(["toml", "toml", "toml", "bytes", "spliced"]))
    if kind == "bytes":
        return draw(st.one_of(st.binary(max_size=500), st.just(b"\xff\xfe[site]\n"), st.just(b"[site\n")))
    tables: dict[str, dict[str, object]] = {"security": {"secret_key": "s3cret-" * 6}}
    for section in draw(st.lists(st.sampled_from(sorted(CONFIG_KEYS)), max_size=4)):
        for key in draw(st.lists(st.sampled_from(CONFIG_KEYS[section]), max_size=3)):
            tables.setdefault(section, {})[key] = draw(CONFIG_VALUES)
    url = draw(
        st.sampled_from(
            [database_url] * 4
            + [
                "sqlite:///other.db",
                "postgresql+psycopg://u@127.0.0.1:1/x",
                "mysql://u@127.0.0.1/x",
                "sqlite",
                "",
                "sqlite:///dir/x.db",
            ]
        )
    )
    tables["database"] = {"url": url}
    if draw(st.integers(0, 3)) == 0:  # DKIM switched on, with a key file that is anything but a key
        tables["dkim"] = {
            "selector": draw(st.sampled_from(["news", "news2026", "-bad", ""])),
            "private_key_file": draw(
                st.one_of(st.sampled_from(["junk.pem", "missing.pem", ".", os.devnull, "junk.pem\n"]), hostile_text(30))
            ),
        }
    text = "".join(
        f"[{section}]\n" + "".join(f"{key} = {_toml_value(value)}\n" for key, value in keys.items())
        for section, keys in tables.items()
    )
    data = text.encode("utf-8", "surrogatepass")
    if kind == "spliced":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\x00", b"\xff", b"\n[", b"=", b'"', b"\r"])) + data[at:]
    return data


@hostile_settings(120)
@given(data=st.data())
def test_config_files_full_of_junk(
    invoke,
    nl,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    data: st.DataObject,
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("NEWSLETTER_"):
            monkeypatch.delenv(name)
    (tmp_path / "junk.pem").write_bytes(data.draw(st.binary(max_size=300)))
    content = data.draw(config_files(str(nl.engine.url)))
    path = tmp_path / "random.toml"
    path.write_bytes(content)
    command = data.draw(
        st.sampled_from([("stats",), ("subscribers", "list"), ("posts", "list"), ("send", "--dry-run", "--no-fetch")])
    )
    result = invoke(*command, config=path)
    TRIED["newsletter --config <junk file>"] += 1
    assert_clean_exit(result)


@pytest.mark.parametrize("where", ["missing", "directory", "empty", "dev-null"])
def test_config_paths_that_are_not_files(invoke, tmp_path: Path, where: str) -> None:
    path = {
        "missing": tmp_path / "nope.toml",
        "directory": tmp_path,
        "empty": tmp_path / "empty.toml",
        "dev-null": Path(os.devnull),
    }[where]
    if where == "empty":
        path.write_bytes(b"")
    result = invoke("stats", config=path)
    TRIED["newsletter --config <junk file>"] += 1
    assert_clean_exit(result)
    assert result.exit_code == 2


FEED_ITEM = (
    "<item><title>{title}</title><link>{link}</link><guid>{guid}</guid>"
    "<pubDate>{date}</pubDate><description><![CDATA[{summary}]]></description></item>"
)


@st.composite
def feeds(draw: st.DrawFn, original: bytes) -> bytes:
    kind = draw(st.sampled_from(["items", "items", "bytes", "spliced"]))
    if kind == "bytes":
        return draw(st.binary(max_size=800))
    if kind == "spliced":
        at = draw(st.integers(0, len(original)))
        return original[:at] + draw(st.binary(max_size=30)) + original[at:]
    items = "".join(
        FEED_ITEM.format(
            title=draw(hostile_text(60)).replace("]]>", ""),
            link=draw(URLS),
            guid=draw(hostile_text(30)),
            date=draw(
                st.one_of(
                    st.sampled_from(
                        [
                            "Tue, 01 Apr 2025 10:00:00 +0000",
                            "Mon, 31 Dec 9999 23:59:59 -1200",
                            "Sat, 01 Jan 0001 00:00:00 +1400",
                            "yesterday",
                            "",
                        ]
                    ),
                    hostile_text(20),
                )
            ),
            summary=draw(hostile_text(100)).replace("]]>", ""),
        )
        for _ in range(draw(st.integers(1, 4)))
    )
    return original.replace(b"<item>", items.encode("utf-8", "surrogatepass") + b"<item>", 1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning:feedparser")
@hostile_settings(60)
@given(data=st.data())
def test_send_dry_run_on_a_hostile_feed(invoke, nl, feed: Path, data: st.DataObject) -> None:
    original = (Path(__file__).parent / "feeds" / "wordpress-rss2.xml").read_bytes()
    content = data.draw(feeds(original))
    feed.write_bytes(content)
    before = snapshot(nl), count_rows(nl, Post)
    result = invoke("send", "--dry-run")
    TRIED["newsletter send --dry-run"] += 1
    assert_clean_exit(result)
    assert (snapshot(nl), count_rows(nl, Post)) == before  # a dry run records nothing
    if result.exit_code == 0:
        lines = terminal_lines(result.output)[:-1]
        assert lines[-1].startswith("dry run: ") and all(
            line.startswith(("would announce: ", "first fetch of the feed", "dry run: ")) for line in lines
        ), lines


# ---- header injection -----------------------------------------------------------------------------


def header_block(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def assert_no_injected_header(caught, recipient: str) -> None:
    assert [r.lower() for r in caught.recipients] == [recipient]
    message = caught.message
    assert message["Bcc"] is None and message["Cc"] is None
    assert not any(line.lower().startswith((b"bcc:", b"cc:")) for line in header_block(caught.raw))
    assert len(message.get_all("To")) == 1 and "x@y.z" not in str(message["To"])
    assert not re.search(r"[\r\n]", str(message["Subject"]))


@hostile_settings(15)
@given(
    injection=st.sampled_from(INJECTIONS),
    before=hostile_text(10).filter(lambda s: "\x00" not in s),
    after=hostile_text(10).filter(lambda s: "\x00" not in s),
)
def test_header_injection_in_titles_and_addresses(
    invoke,
    nl,
    smtp,
    injection: str,
    before: str,
    after: str,
) -> None:
    if count_rows(nl, Subscriber) == 0:
        assert invoke("subscribers", "add", "--confirmed", "reader@example.com").exit_code == 0
    smtp.clear()
    title = before + injection + after
    added = invoke(
        "posts",
        "add",
        "--title",
        title,
        "--url",
        f"https://blog.example/{secrets.token_hex(6)}/",
        "--summary",
        injection,
    )
    TRIED["header injection (posts add, send, send --to, subscribers add)"] += 1
    assert_clean_exit(added)
    if added.exit_code == 0:
        sent = invoke("send", "--no-fetch")
        assert_clean_exit(sent)
        assert sent.exit_code == 0, sent.output
        copy = invoke("send", "--to", "me@example.com")
        assert_clean_exit(copy)
        assert len(smtp.messages) == 2
        for caught, recipient in zip(smtp.messages, ["reader@example.com", "me@example.com"], strict=True):
            assert_no_injected_header(caught, recipient)
            assert "\n" not in caught.message["Subject"]
    smtp.clear()
    for address in (injection, "me@example.com" + injection, injection + "@example.com"):
        for args in (("send", "--to", address), ("subscribers", "add", "--confirmed", "--", address)):
            result = invoke(*args)
            assert_clean_exit(result)
            assert result.exit_code == 1
    assert smtp.messages == []
    assert all("y.z" not in key for _, key, _ in snapshot(nl).subscribers)


@pytest.mark.parametrize("injection", INJECTIONS)
def test_header_injection_through_the_subscribe_form(site, smtp, injection: str) -> None:
    for address in (injection, "reader@example.com" + injection, "reader@example.com\nBcc: x@y.z"):
        before = snapshot(site.nl)
        response = site.subscribe(address)
        TRIED["header injection (POST /subscribe, real HTTP)"] += 1
        assert response.status_code == 400 and 'class="error"' in response.text
        assert snapshot(site.nl) == before
    assert site.subscribe("reader@example.com").status_code == 200
    site.deliver_outbox()
    [caught] = smtp.messages
    assert_no_injected_header(caught, "reader@example.com")


def test_the_feed_cannot_inject_headers_either(invoke, nl, smtp, feed: Path) -> None:
    assert invoke("subscribers", "add", "--confirmed", "reader@example.com").exit_code == 0
    assert invoke("posts", "fetch").exit_code == 0
    for i, injection in enumerate(INJECTIONS):
        publish(feed, injection.replace("<", "&lt;"), f"injected-{i}")
    TRIED["header injection (feed titles)"] += len(INJECTIONS)
    smtp.clear()
    result = invoke("send")
    assert_clean_exit(result)
    assert result.exit_code == 0 and len(smtp.messages) == len(INJECTIONS)
    for caught in smtp.messages:
        assert_no_injected_header(caught, "reader@example.com")


# ---- focused cases for what the properties above turned up -------------------------------------


@pytest.mark.parametrize("option", ["--title", "--url", "--summary"])
def test_posts_add_with_argv_bytes_that_are_not_utf8(invoke, nl, option: str) -> None:
    """`newsletter posts add --title $'caf\\xe9'` (Latin-1 from an old terminal) reaches Python as a lone surrogate."""
    values = {"--title": "Hello", "--url": "https://blog.example/hello/", "--summary": "Fresh words."}
    values[option] = (values[option] if option != "--url" else "https://blog.example/") + os.fsdecode(b"caf\xe9")
    result = invoke("posts", "add", *[part for pair in values.items() for part in pair])
    TRIED["newsletter posts add"] += 1
    assert_clean_exit(result)
    assert result.exit_code == 1
    assert count_rows(nl, Post) == 0


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"])
def test_import_dates_at_the_edge_of_time(invoke, nl, tmp_path: Path, when: str) -> None:
    """A date whose UTC equivalent falls before year 1 or after 9999 skips the line; no OverflowError."""
    path = tmp_path / "readers.csv"
    path.write_text(f"email,status,created_at\nold@example.com,confirmed,{when}\n", encoding="utf-8")
    result = invoke("subscribers", "import", "--verbose", str(path))
    TRIED["newsletter subscribers import"] += 1
    assert_clean_exit(result)
    assert "line 2" in result.output and count_rows(nl, Subscriber) == 0


@pytest.mark.parametrize(
    "method, path", [("PUT", "/"), ("GET", "/subscribe"), ("DELETE", "/healthz"), ("PATCH", "/confirm/not-a-token")]
)
def test_a_405_says_which_methods_are_allowed(site, method: str, path: str) -> None:
    """RFC 9110 15.5.6: a 405 MUST carry an Allow header, error page or not."""
    response = requests.request(method, site.base + path, timeout=10)
    TRIED["wrong methods on every route (real HTTP)"] += 1
    assert response.status_code == 405
    assert "Allow" in response.headers


def test_send_to_nobody_sends_to_everybody(invoke, nl, smtp) -> None:
    """`newsletter send --to "$ME"` with ME unset is refused; it never falls through to mailing the whole list."""
    assert invoke("subscribers", "add", "--confirmed", "everyone@example.com").exit_code == 0
    assert invoke("posts", "add", "--title", "Draft", "--url", "https://blog.example/draft/").exit_code == 0
    result = invoke("send", "--to", "", "--no-fetch")
    TRIED["newsletter send --to"] += 1
    assert_clean_exit(result)
    assert smtp.messages == []
    assert result.exit_code == 1


@pytest.mark.parametrize(
    "url", ["https://blog.example/a\r\nBcc: x@y.z", "https://blog.example/\x00", "https://blog.example/a\tb"]
)
def test_posts_add_refuses_a_url_with_control_characters(invoke, nl, url: str) -> None:
    """Only `starts with http(s)://` is not enough: a line break, NUL or tab would be stored and mailed."""
    result = invoke("posts", "add", "--title", "Hello", "--url", url)
    TRIED["newsletter posts add"] += 1
    assert_clean_exit(result)
    assert result.exit_code == 1
    assert count_rows(nl, Post) == 0


def test_remove_of_an_unknown_address_says_so_in_one_line(invoke) -> None:
    """An address pasted with a line break is echoed quoted, so the error stays one line."""
    result = invoke("subscribers", "remove", "--", "\nnobody@example.com")
    TRIED["newsletter subscribers remove"] += 1
    assert_clean_exit(result)
    assert result.exit_code == 1


@pytest.mark.parametrize("source", ["import", "summary", "feed"])
def test_nul_characters_never_reach_the_database(
    invoke,
    nl,
    tmp_path: Path,
    feed: Path,
    source: str,
) -> None:
    """NUL from a CSV IP column, a plain-text summary or a feed link: SQLite would keep it, PostgreSQL
    refuses it (DataError), so it must be dropped or refused before it is stored."""
    if source == "import":
        path = tmp_path / "readers.csv"
        path.write_bytes(b"email,subscribed_ip\nip@example.com,192.0.2.1\x00\n")
        result = invoke("subscribers", "import", str(path))
        TRIED["newsletter subscribers import"] += 1
    elif source == "summary":
        result = invoke(
            "posts", "add", "--title", "Hello", "--url", "https://blog.example/hello/", "--summary", "Fresh\x00words."
        )
        TRIED["newsletter posts add"] += 1
    else:
        assert invoke("posts", "fetch").exit_code == 0
        publish(feed, "Nul", "a\x00b")
        result = invoke("send", "--dry-run")
        TRIED["newsletter send --dry-run"] += 1
        assert_clean_exit(result)
        result = invoke("posts", "fetch")
    assert_clean_exit(result)
    with nl.sessions() as session:
        stored = [
            *session.scalars(select(Subscriber.subscribed_ip)),
            *session.scalars(select(Post.summary_html)),
            *session.scalars(select(Post.url)),
            *session.scalars(select(Post.guid)),
        ]
    assert not any("\x00" in (value or "") for value in stored)


def test_posts_add_refuses_a_url_longer_than_its_column(invoke, nl) -> None:
    """The column holds 2048 characters; PostgreSQL refuses more with a DataError, SQLite keeps it whole."""
    result = invoke("posts", "add", "--title", "Hello", "--url", "https://blog.example/" + "a" * 3000)
    TRIED["newsletter posts add"] += 1
    assert_clean_exit(result)
    assert result.exit_code == 1
    assert count_rows(nl, Post) == 0


@pytest.mark.parametrize("key_file", ["dkim\\u0000.pem", "~nosuchuser-for-newsletter/dkim.pem"])
def test_a_dkim_key_path_that_cannot_be_a_path_is_a_config_error(
    invoke,
    config_file: Path,
    key_file: str,
) -> None:
    """A NUL in the path (ValueError) or ~ of an unknown user (RuntimeError) is a config error, exit 2."""
    with config_file.open("a", encoding="utf-8") as file:
        file.write(f'\n[dkim]\nselector = "news"\nprivate_key_file = "{key_file}"\n')
    result = invoke("stats")
    TRIED["newsletter --config <junk file>"] += 1
    assert_clean_exit(result)
    assert result.exit_code == 2
