"""The exact bytes that reach the SMTP server, checked against the message-format rules.

Rule IDs (MSG-*, WEB-6, WEB-8) refer to the project's email standards checklist. Every message here is
captured by a real aiosmtpd server after a real SMTP session, then linted byte by byte.
"""

from __future__ import annotations

import binascii
import html as htmllib
import json
import re
import shutil
from collections.abc import Callable
from email import message_from_bytes, policy
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

import pytest
from click.testing import CliRunner, Result
from hypothesis import given
from hypothesis import strategies as st

from newsletter.cli import cli
from newsletter.messages import RecipientLinks, _fill, _link, _qp_line, _qp_lines

from .conftest import publish

MESSAGE_ID = re.compile(r"^<[^@\s]+@harbour-notes\.example>$")
ENCODED_WORD = re.compile(rb"=\?[^?\s]+\?[qQbB]\?[^?\s]*\?=")
LIST_ID = re.compile(r"^.*<[A-Za-z0-9-]+(\.[A-Za-z0-9-]+){2,}>$")
LIST_UNSUBSCRIBE = re.compile(rb"^List-Unsubscribe: ?(\r\n[ \t])?<https://[^\s<>]+>", re.M)
TEXT_URL = re.compile(r"https://[^\s<>\"]+")
LOOKS_LIKE_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|www\.)\S+$", re.I)
NOTIFICATION_HEADERS = {
    "From",
    "Subject",
    "Date",
    "MIME-Version",
    "Auto-Submitted",
    "List-Id",
    "Precedence",
    "To",
    "Message-ID",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Content-Type",
}
SINGLE_HEADERS = {"From", "Subject", "Date", "MIME-Version", "Auto-Submitted", "To", "Message-ID", "Content-Type"}
INJECTIONS = ["a\r\nBcc: x@y.z", "a\nb", "=?utf-8?q?hi=0ABcc:_x@y.z?=", "\x00"]


# ---- the lint (MSG-15) ------------------------------------------------------------------------------


class _Html(HTMLParser):
    """Tags, hrefs and anchor texts of an HTML part."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.anchors: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "a":
            self._href, self._text = dict(attrs).get("href") or "", []

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.anchors.append((self._href, "".join(self._text).strip()))
            self._href = None

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)


def parse_html(document: str) -> _Html:
    parser = _Html()
    parser.feed(document)
    parser.close()
    return parser


def raw_headers(raw: bytes) -> list[tuple[str, bytes]]:
    """(name, value as on the wire, folds included) for each header field of the top-level head."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    fields: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + b"\r\n" + line)
        else:
            name, _, value = line.partition(b":")
            fields.append((name.decode("ascii"), value))
    return fields


def raw_header(raw: bytes, name: str) -> bytes:
    [value] = [v for n, v in raw_headers(raw) if n.lower() == name.lower()]
    return value


def text_urls(text: str) -> set[str]:
    """https URLs in a plain-text part; a closing parenthesis that only wraps the URL is not part of it."""
    urls = set()
    for url in TEXT_URL.findall(text):
        url = url.rstrip(".,;:")
        while url.endswith(")") and url.count("(") < url.count(")"):
            url = url[:-1]
        urls.add(url)
    return urls


def assert_wire_ok(raw: bytes) -> EmailMessage:
    """MSG-15: the MSG-1..MSG-14 checks that apply to every message, on the bytes as received."""
    # MSG-7: CRLF only; MSG-6: no line over 998 octets
    rest = raw.replace(b"\r\n", b"")
    assert b"\n" not in rest and b"\r" not in rest, "bare CR or LF on the wire"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998

    msg: EmailMessage = message_from_bytes(raw, policy=policy.default)  # type: ignore[assignment]
    for part in msg.walk():
        assert part.defects == [], (part.get_content_type(), part.defects)

    # MSG-1: exactly one Date (numeric zone, not -0000) and one From
    dates = msg.get_all("Date")
    assert dates is not None and len(dates) == 1
    assert re.search(r"[+-]\d{4}$", str(dates[0])) and not str(dates[0]).endswith("-0000"), dates[0]
    senders = msg.get_all("From")
    assert senders is not None and len(senders) == 1 and len(senders[0].addresses) == 1
    assert senders[0].addresses[0].domain == "harbour-notes.example"
    # MSG-3: exactly one To with one address, no Bcc
    recipients = msg.get_all("To")
    assert recipients is not None and len(recipients) == 1 and len(recipients[0].addresses) == 1
    assert msg.get_all("Bcc") is None
    # MSG-2: a Message-ID on the sending domain
    ids = msg.get_all("Message-ID")
    assert ids is not None and len(ids) == 1 and MESSAGE_ID.fullmatch(str(ids[0])), ids
    # MSG-4: headers are ASCII on the wire (no controls, WEB-6); encoded-words are complete, at most
    # 75 characters and never adjacent without whitespace
    for name, value in raw_headers(raw):
        assert value.isascii() and not re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", value), (name, value)
        assert b"?==?" not in value, (name, value)
        words = ENCODED_WORD.findall(value)
        assert b"=?" not in ENCODED_WORD.sub(b"", value), (name, value)
        for word in words:
            assert len(word) <= 75, (name, word)
    raw_header(raw, "Subject")  # exactly one

    # MSG-5: multipart/alternative, text/plain then text/html, both utf-8
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert [p.get_content_charset() for p in parts] == ["utf-8", "utf-8"]
    # MSG-6: quoted-printable (or 7bit) bodies with encoded lines of at most 76 characters
    for part in parts:
        encoding = part.get("Content-Transfer-Encoding", "7bit").lower()
        assert encoding in ("quoted-printable", "base64", "7bit"), encoding
        if encoding == "quoted-printable":
            body = part.get_payload(decode=False)
            assert max(len(line) for line in re.split(r"\r?\n", body)) <= 76

    text, html = parts[0].get_content(), parts[1].get_content()
    page = parse_html(html)
    # MSG-5: the two parts carry the same links
    hrefs = {htmllib.unescape(href) for href, _ in page.anchors if href.startswith("https://")}
    assert text_urls(text) == hrefs, text_urls(text) ^ hrefs
    # MSG-16: no script or form; the HTML part is a whole document
    assert "script" not in page.tags and "form" not in page.tags
    assert "html" in page.tags and html.lstrip().lower().startswith(("<!doctype html", "<html"))
    return msg


# ---- helpers ----------------------------------------------------------------------------------------


def confirm_link(text: str) -> str:
    return next(url for url in text_urls(text) if "/confirm/" in url)


def config_variant(config_file: Path, **site: str) -> Path:
    """A copy of the test configuration with some [site] (or the [smtp] from) values changed."""
    content = config_file.read_text(encoding="utf-8")
    for key, value in site.items():
        key = "from" if key == "from_" else key
        content, count = re.subn(
            rf"^{key} = .*$",
            lambda _, key=key, value=value: f"{key} = {json.dumps(value)}",
            content,
            count=1,
            flags=re.M,
        )
        assert count == 1, key
    path = config_file.with_name("variant.toml")
    path.write_text(content, encoding="utf-8")
    return path


def cli_with(path: Path) -> Callable[..., Result]:
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        return runner.invoke(cli, ["--config", str(path), *args], catch_exceptions=False)

    return invoke


def notify(
    run: Callable[..., Result],
    feed: Path,
    title: str,
    slug: str = "post",
    summary: str = "<p>Fresh words.</p>",
    *,
    readers: tuple[str, ...] = ("reader@example.com",),
) -> str:
    """Fetch the feed, add confirmed READERS, publish one post and send it; returns the post URL."""
    assert run("posts", "fetch").exit_code == 0
    for address in readers:
        assert run("subscribers", "add", address, "--confirmed").exit_code == 0
    url = publish(feed, title, slug, summary)
    result = run("send")
    assert result.exit_code == 0, result.output
    return url


# ---- confirmation and welcome -----------------------------------------------------------------------


def test_confirmation_and_welcome_pass_the_wire_lint_msg15(site, smtp) -> None:
    """MSG-15: both one-off emails pass the lint, and carry the reader in To and the envelope (MSG-3)."""
    assert site.subscribe("ada@example.com").status_code == 200
    site.deliver_outbox()
    [confirmation] = smtp.to("ada@example.com")
    msg = assert_wire_ok(confirmation.raw)
    assert set(msg.keys()) == SINGLE_HEADERS
    assert msg["To"].addresses[0].addr_spec == "ada@example.com" and confirmation.recipients == ["ada@example.com"]
    assert msg["Auto-Submitted"] == "auto-generated"  # MSG-10
    link = confirm_link(confirmation.text)
    assert link.startswith("https://news.example.com/confirm/")

    assert site.press(link).status_code == 200
    smtp.clear()
    site.deliver_outbox()
    [welcome] = smtp.to("ada@example.com")
    msg = assert_wire_ok(welcome.raw)
    assert set(msg.keys()) == SINGLE_HEADERS
    assert msg["Subject"] == "You're subscribed to Harbour Notes"
    assert msg["Message-ID"] != message_from_bytes(confirmation.raw, policy=policy.default)["Message-ID"]
    assert any("/unsubscribe/" in url for url in text_urls(welcome.text))


# ---- notifications ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["wordpress-rss2.xml", "atom.xml"])
def test_existing_feed_posts_pass_the_wire_lint_msg5_msg15(source, smtp, run, feed) -> None:
    """MSG-15: the sample feeds' own posts (images, 'Continue reading' links, a table, an Atom entry with a
    relative link) give clean messages; MSG-5: links in the summary appear in both parts."""
    shutil.copy(Path(__file__).parent / "feeds" / source, feed)
    assert run("subscribers", "add", "reader@example.com", "--confirmed").exit_code == 0
    assert run("posts", "fetch", "--announce-existing").exit_code == 0
    assert run("send", "--no-fetch").exit_code == 0
    assert len(smtp.messages) in (2, 3)
    for note in smtp.messages:
        msg = assert_wire_ok(note.raw)
        assert set(msg.keys()) == NOTIFICATION_HEADERS


def test_notification_passes_the_wire_lint_msg15(smtp, run, feed) -> None:
    """MSG-15, MSG-10: a plain notification passes the lint and carries exactly the expected headers."""
    url = notify(run, feed, "Ice on the quay")
    [note] = smtp.messages
    msg = assert_wire_ok(note.raw)
    assert set(msg.keys()) == NOTIFICATION_HEADERS
    assert msg["Subject"] == "Ice on the quay"
    assert msg["Auto-Submitted"] == "auto-generated" and msg["Precedence"] == "bulk"
    assert raw_header(note.raw, "Auto-Submitted") == b" auto-generated"
    assert url in note.text and url in note.html


HARD_TITLE = (
    'Grüße aus Kühlungsborn: <Hafen> & "Möwen" — '
    + "Donaudampfschifffahrtsgesellschaftskapitänsmützenabzeichenherstellerinnungsversammlung "
    + "x" * 85
    + " "
    + "ÆØÅ æøå 港の朝 "
)
HARD_TITLE = (HARD_TITLE * 3)[:299].rstrip() + "!"
LONG_LINE = "harbour " * 150  # 1,200 characters on one line
HARD_SUMMARY = f"<p>{LONG_LINE}</p><p>{'ø' * 1200}</p>"


def hard_post(source: str, run, feed: Path) -> str:
    """Send the post with HARD_TITLE and HARD_SUMMARY, from the feed or added by hand; returns its URL."""
    if source == "feed":
        return notify(run, feed, xml_escape(HARD_TITLE, {'"': "&quot;"}), "hard", HARD_SUMMARY)
    url = "https://harbour-notes.example/2025/04/hard/"
    assert run("subscribers", "add", "reader@example.com", "--confirmed").exit_code == 0
    added = run("posts", "add", "--title", HARD_TITLE, "--url", url, "--summary", HARD_SUMMARY)
    assert added.exit_code == 0, added.output
    assert run("send").exit_code == 0
    return url


def test_long_summary_lines_stay_within_line_limits_msg6(smtp, run, feed) -> None:
    """MSG-6: a summary with 1,200-character lines (ASCII and non-ASCII) is sent quoted-printable with
    lines of at most 76 characters, nothing on the wire over 998, and decodes back unchanged."""
    notify(run, feed, "Long lines on the quay", "long", HARD_SUMMARY)
    [note] = smtp.messages
    assert_wire_ok(note.raw)
    assert LONG_LINE.strip() in note.text and "ø" * 1200 in note.text
    assert LONG_LINE.strip() in note.html and "ø" * 1200 in note.html


def test_lines_that_start_with_a_dot_arrive_whole(smtp, run, feed) -> None:
    """SMTP ends a message at a line holding a dot and drops the first dot of any other line that starts with
    one. The email is written so that no line on the wire starts with a dot (a leading dot is =2E, also where
    quoted-printable wraps a long line just before one), so the sender sends it as it is and the reader still
    reads every dot."""
    dotted = "<p>.\n.hidden file\n..two dots</p><p>" + "x" * 75 + ".after the wrap</p>"
    notify(run, feed, "Dots on the quay", "dots", dotted)
    [note] = smtp.messages
    assert b"\r\n." not in note.raw
    for text in (note.text, note.html):
        assert ".hidden file" in text and "..two dots" in text and "x" * 75 + ".after the wrap" in text


@pytest.mark.parametrize("source", ["feed", "posts add"])
def test_hard_title_round_trips_msg4_web8(source, smtp, run, feed) -> None:
    """MSG-4: a 300-char non-ASCII title with <>&" and 80+ char words becomes an ASCII Subject with no
    adjacent encoded-words that decodes to the title cut at 200; WEB-8: the body shows it escaped in
    HTML and as written in text."""
    assert len(HARD_TITLE) == 300 and max(len(w) for w in HARD_TITLE.split()) > 80
    url = hard_post(source, run, feed)
    [note] = smtp.messages
    msg = note.message
    assert all(part.defects == [] for part in msg.walk())
    subject = raw_header(note.raw, "Subject")
    assert subject.isascii() and b"?==?" not in subject
    assert msg["Subject"] == HARD_TITLE[:199].rstrip() + "…"
    assert HARD_TITLE in note.text.splitlines()
    assert htmllib.escape(HARD_TITLE, quote=False) in note.html.replace("&#34;", '"')
    assert "<Hafen>" not in note.html and "&lt;Hafen&gt;" in note.html
    assert url in note.text and url in note.html


@pytest.mark.parametrize("source", ["feed", "posts add"])
def test_hard_title_passes_the_wire_lint_msg4_msg15(source, smtp, run, feed) -> None:
    """MSG-15: the notification for the hard title passes the whole lint."""
    hard_post(source, run, feed)
    [note] = smtp.messages
    assert_wire_ok(note.raw)


def test_three_recipients_get_three_message_ids_msg2_msg3(smtp, run, feed) -> None:
    """MSG-2: one new Message-ID per message on the sending domain. MSG-3: each message is addressed to
    exactly its subscriber, in To and in the envelope, with no Bcc."""
    readers = ("a@example.com", "b@example.com", "c@example.com")
    notify(run, feed, "Harbour works begin", readers=readers)
    assert len(smtp.messages) == 3
    ids = set()
    for address in readers:
        [note] = smtp.to(address)
        msg = assert_wire_ok(note.raw)
        assert note.recipients == [address]
        assert [a.addr_spec for a in msg["To"].addresses] == [address]
        assert raw_header(note.raw, "To").strip() == address.encode()
        assert msg.get_all("Bcc") is None and b"\r\nBcc:" not in note.raw.split(b"\r\n\r\n", 1)[0]
        ids.add(msg["Message-ID"])
    assert len(ids) == 3 and all(MESSAGE_ID.fullmatch(i) for i in ids)


def test_idn_subscriber_gets_punycode_in_to_and_rcpt_msg9(smtp, run, feed) -> None:
    """MSG-9: an IDN domain goes out as its A-label in the To header and in RCPT TO, never as an encoded-word."""
    notify(run, feed, "Bücher am Kai", readers=("user@bücher.example",))
    [note] = smtp.messages
    assert_wire_ok(note.raw)
    to = raw_header(note.raw, "To")
    assert b"xn--bcher-kva" in to and b"=?" not in to
    assert to.strip() == b"user@xn--bcher-kva.example"
    assert note.recipients == ["user@xn--bcher-kva.example"]


def test_list_id_msg11(smtp, run, feed) -> None:
    """MSG-11: List-Id is a phrase and a bracketed identifier of 3+ labels, at most 255 bytes."""
    notify(run, feed, "Spring tides")
    [note] = smtp.messages
    msg = assert_wire_ok(note.raw)
    value = str(msg["List-Id"])
    assert LIST_ID.match(value), value
    assert len(value[value.rindex("<") + 1 : -1].encode()) <= 255
    assert value == '"Harbour Notes new posts" <newposts.news.example.com>'


@pytest.mark.parametrize("name", ["Hafennotizen Kühlungsborn", "港の朝"], ids=["latin", "cjk"])
def test_list_id_with_non_ascii_site_name_msg11(name, smtp, config_file, feed) -> None:
    """MSG-11: a non-ASCII site name is RFC 2047-encoded in the List-Id phrase; the identifier stays plain."""
    check_non_ascii_list_id(name, smtp, config_file, feed)


def test_list_id_with_long_non_ascii_site_name_msg11(smtp, config_file, feed) -> None:
    """MSG-11: the same for a site name long enough that the List-Id phrase needs several encoded-words."""
    check_non_ascii_list_id(
        "Ærøskøbing Havneblad — nyheder fra kajen, fiskeriet og færgerne i det sydfynske øhav", smtp, config_file, feed
    )


def check_non_ascii_list_id(name: str, smtp, config_file: Path, feed: Path) -> None:
    run = cli_with(config_variant(config_file, name=name))
    assert run("db", "upgrade").exit_code == 0
    notify(run, feed, "Fresh catch")
    [note] = smtp.messages
    msg = assert_wire_ok(note.raw)
    value = str(msg["List-Id"])
    assert LIST_ID.match(value), value
    assert value == f"{name} new posts <newposts.news.example.com>"
    identifier = raw_header(note.raw, "List-Id").rsplit(b"<", 1)[1]
    assert identifier == b"newposts.news.example.com>" and len(identifier) - 1 <= 255
    assert msg["Subject"] == "Fresh catch"


def test_list_unsubscribe_is_one_plain_https_uri_msg12_msg14(smtp, run, feed) -> None:
    """MSG-12, MSG-14: one https URI in angle brackets, not encoded or folded inside, the exact Post
    header, and the same URL visible in both body parts."""
    notify(run, feed, "Spring tides")
    [note] = smtp.messages
    check_list_unsubscribe(note, "https://news.example.com")


def check_list_unsubscribe(note, base_url: str) -> None:
    assert_wire_ok(note.raw)
    assert LIST_UNSUBSCRIBE.search(note.raw), raw_header(note.raw, "List-Unsubscribe")
    header = raw_header(note.raw, "List-Unsubscribe")
    assert b"=?" not in header
    uris = re.findall(rb"<([^<>]*)>", header)
    assert len(uris) == 1 and header.strip() == b"<" + uris[0] + b">"
    url = uris[0].decode("ascii")
    assert url.startswith(f"{base_url}/unsubscribe/") and not re.search(r"\s", url)
    assert raw_header(note.raw, "List-Unsubscribe-Post") == b" List-Unsubscribe=One-Click"
    assert url in text_urls(note.text)
    assert url in {htmllib.unescape(href) for href, _ in parse_html(note.html).anchors}


LONG_BASE_URLS = [
    "https://news.example.com/" + "p" * 125,  # 150 characters
    "https://" + "a" * 63 + "." + "b" * 63 + ".example/" + "n" * 6,  # 150, long host
    "https://news.example.com:8443/" + "/".join(["blog"] * 34)[:170],  # 200, the maximum
]


@pytest.mark.parametrize("base_url", LONG_BASE_URLS, ids=lambda u: f"{len(u)}-chars")
def test_list_unsubscribe_stays_plain_with_long_base_urls_msg14(base_url, smtp, config_file, feed) -> None:
    """MSG-14: however long the URL, List-Unsubscribe is written as a literal <https://...>; MSG-11 holds too."""
    run = cli_with(config_variant(config_file, base_url=base_url))
    assert run("db", "upgrade").exit_code == 0
    notify(run, feed, "Spring tides")
    [note] = smtp.messages
    check_list_unsubscribe(note, base_url)
    list_id = str(note.message["List-Id"])
    assert LIST_ID.match(list_id) and len(list_id[list_id.rindex("<") + 1 : -1]) <= 255


# ---- header injection (WEB-6) -----------------------------------------------------------------------


@pytest.mark.parametrize("payload", INJECTIONS, ids=["crlf-bcc", "lf", "encoded-word-bcc", "nul"])
def test_title_from_posts_add_cannot_inject_headers_web6(payload, smtp, run) -> None:
    """WEB-6: a hand-added title is refused with a clear message, or yields exactly the expected headers."""
    run("subscribers", "add", "reader@example.com", "--confirmed")
    added = run("posts", "add", "--title", payload, "--url", "https://harbour-notes.example/2025/04/x/")
    if added.exit_code != 0:
        assert "--title" in added.output, added.output
        return
    assert run("send").exit_code == 0
    [note] = smtp.messages
    check_no_injection(note)


@pytest.mark.parametrize("payload", INJECTIONS, ids=["crlf-bcc", "lf", "encoded-word-bcc", "nul"])
def test_title_from_feed_cannot_inject_headers_web6(payload, smtp, run, feed) -> None:
    """WEB-6: the same payloads as a feed item's title."""
    run("posts", "fetch")
    run("subscribers", "add", "reader@example.com", "--confirmed")
    publish(feed, payload, "x")
    result = run("send")
    assert result.exit_code == 0, result.output
    [note] = smtp.messages
    check_no_injection(note)


def check_no_injection(note) -> None:
    msg = assert_wire_ok(note.raw)
    assert msg.get_all("Bcc") is None
    assert set(msg.keys()) == NOTIFICATION_HEADERS
    assert not re.search(r"[\x00-\x1f]", str(msg["Subject"]))
    assert not re.search(rb"^Bcc:", note.raw.split(b"\r\n\r\n", 1)[0], re.M | re.I)
    assert note.recipients == ["reader@example.com"]


@pytest.mark.parametrize(
    "name",
    ["Harbour\r\nBcc: x@y.z", "Harbour\nNotes", "Harbour\rNotes", "Harbour\x00", "=?utf-8?q?hi=0ABcc:_x@y.z?="],
    ids=["crlf-bcc", "lf", "cr", "nul", "encoded-word-bcc"],
)
def test_site_name_with_line_breaks_is_rejected_web6(name, config_file) -> None:
    """WEB-6: the site name goes into headers, so the configuration refuses CR, LF, NUL and encoded-words."""
    result = cli_with(config_variant(config_file, name=name))("posts", "list")
    assert result.exit_code == 2
    assert "[site] name" in result.output


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("name", "Harbour\x0bNotes"),
        ("name", "Harbour\x1b[31mNotes"),
        ("name", "Harbour\x7fNotes"),
        ("from_", "Harbour\x0bNotes <news@harbour-notes.example>"),
    ],
    ids=["name-vt", "name-esc", "name-del", "from-vt"],
)
def test_other_controls_in_config_never_reach_a_header_web6(key, value, smtp, config_file, feed) -> None:
    """WEB-6: other C0 controls (and DEL) in header values from the configuration are refused (exit 2),
    or kept out of every header."""
    run = cli_with(config_variant(config_file, **{key: value}))
    upgraded = run("db", "upgrade")
    if upgraded.exit_code != 0:
        assert upgraded.exit_code == 2 and ("[site] name" in upgraded.output or "[smtp] from" in upgraded.output)
        return
    notify(run, feed, "Spring tides")
    [note] = smtp.messages
    assert_wire_ok(note.raw)


def test_feed_title_of_only_controls_falls_back_to_the_url_web6(smtp, run, feed) -> None:
    """WEB-6: a feed title that is nothing but control characters is treated like a missing title."""
    url = notify(run, feed, "\x00\x01", "controls")
    [note] = smtp.messages
    assert_wire_ok(note.raw)
    assert note.message["Subject"] == url
    assert all(text for _, text in parse_html(note.html).anchors)


# ---- HTML safety (WEB-8, MSG-16) --------------------------------------------------------------------


def test_title_is_escaped_in_html_and_literal_in_text_web8(smtp, run) -> None:
    """WEB-8: a title with markup is escaped in the HTML part and appears as written in the text part."""
    title = '<script>alert(1)</script> & "x"'
    run("subscribers", "add", "reader@example.com", "--confirmed")
    assert run("posts", "add", "--title", title, "--url", "https://harbour-notes.example/2025/04/s/").exit_code == 0
    assert run("send").exit_code == 0
    [note] = smtp.messages
    msg = assert_wire_ok(note.raw)
    assert msg["Subject"] == title
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; " in note.html and "<script>" not in note.html
    assert title in note.text.splitlines()
    assert re.findall(r"<[^>]*>", note.text) == ["<script>", "</script>"]  # only the title's own characters


def test_post_text_cannot_pull_in_a_readers_unsubscribe_link(smtp, run) -> None:
    """Text that looks like the engine's per-recipient placeholder stays text: no post can make one reader's
    email carry a link, and each reader's link appears only where the template puts it."""
    bait = "@@unsubscribe-url@@ @@unsubscribe-0123456789abcdef0123456789abcdef@@"
    for address in ("ann@example.com", "bob@example.com"):
        run("subscribers", "add", address, "--confirmed")
    summary = f"Copy this: {bait}"
    run("posts", "add", "--title", f"Bait {bait}", "--url", "https://harbour-notes.example/bait/", "--summary", summary)
    assert run("send", "--no-fetch").exit_code == 0
    for note in smtp.messages:
        own = note.message["List-Unsubscribe"].strip("<>")
        assert bait in note.text and bait in note.html
        assert note.text.count("/unsubscribe/") == note.text.count(own) == 1
        assert note.html.count("/unsubscribe/") == note.html.count(own) == 1


def test_every_email_html_template_is_autoescaped_web8(app) -> None:
    """WEB-8: each templates/email/*.html is rendered with autoescape on by the app's Jinja environment."""
    names = [n for n in app.jinja_env.list_templates() if n.startswith("email/") and n.endswith(".html")]
    assert {"email/base.html", "email/confirmation.html", "email/notification.html", "email/welcome.html"} <= set(names)
    for name in names:
        assert app.jinja_env.autoescape(name) is True, name


def test_links_are_https_and_url_texts_match_their_hrefs_msg16(smtp, run, feed) -> None:
    """MSG-16: no script or form, every href is absolute https, an anchor whose text is a URL links to it."""
    notify(
        run,
        feed,
        "Ice on the quay",
        "ice",
        '<p>Photos at <a href="https://harbour-notes.example/photos/">https://harbour-notes.example/photos/</a>'
        ' and <a href="https://harbour-notes.example/map/">the map</a>.</p>',
    )
    [note] = smtp.messages
    assert_wire_ok(note.raw)
    page = parse_html(note.html)
    assert page.anchors
    for href, text in page.anchors:
        assert href.startswith("https://"), href
        if LOOKS_LIKE_URL.match(text):
            assert text == href, (text, href)
    assert "https://harbour-notes.example/photos/" in text_urls(note.text)
    assert "https://harbour-notes.example/map/" in text_urls(note.text)


def test_relative_link_in_hand_added_summary_becomes_absolute_msg16(smtp, run) -> None:
    """MSG-16: a relative link in a hand-written summary is sent as an absolute https link, in both parts."""
    url = "https://harbour-notes.example/2025/04/tides/"
    run("subscribers", "add", "reader@example.com", "--confirmed")
    added = run(
        "posts", "add", "--title", "Tides", "--url", url, "--summary", '<p>See <a href="/2025/04/map/">the map</a>.</p>'
    )
    assert added.exit_code == 0, added.output
    assert run("send").exit_code == 0
    [note] = smtp.messages
    hrefs = [href for href, _ in parse_html(note.html).anchors]
    assert all(href.startswith("https://") for href in hrefs), hrefs
    assert "https://harbour-notes.example/2025/04/map/" in hrefs
    assert "https://harbour-notes.example/2025/04/map/" in text_urls(note.text)


@given(st.text(alphabet=".. .x=é\t ab", max_size=300))
def test_no_encoded_line_starts_with_a_dot_and_every_line_decodes_back(line: str) -> None:
    """The quoted-printable a body line becomes: no physical line starts with a dot (the sender skips
    dot-stuffing), none is longer than binascii's own wrapping makes it, and it decodes to the line."""
    encoded = _qp_line(line)
    physical = encoded.split(b"\r\n")[:-1]
    plain = binascii.b2a_qp(line.encode() + b"\r\n", istext=True).split(b"\r\n")
    assert not any(p.startswith(b".") for p in physical)
    assert max(map(len, physical)) <= max(76, *map(len, plain))
    assert binascii.a2b_qp(encoded).decode() == line + "\r\n"


@given(
    st.text(alphabet=".. .x=é\t ab", max_size=200),
    st.text(alphabet=".. .x=é\t ab", max_size=200),
    st.text(alphabet="abc./:?=&%-_~é ", max_size=150),
)
def test_a_readers_link_fills_its_line_whole_whatever_surrounds_it(before: str, after: str, url: str) -> None:
    """The line holding a reader's link, encoded ahead and filled in per reader, keeps every rule of an
    encoded line (at most 76 characters, none starting with a dot) and decodes to the line with the link."""
    links = RecipientLinks.new()
    body = _qp_lines(f"{before}{links.unsubscribe}{after}\n{links.manage}", links)
    filled = _fill(body, {"unsubscribe": _link(url), "manage": _link("https://news.example.com/manage/x")})
    physical = filled.split(b"\r\n")[:-1]
    assert not any(p.startswith(b".") for p in physical)
    assert max(map(len, physical)) <= 76
    assert binascii.a2b_qp(filled).decode() == f"{before}{url}{after}\r\nhttps://news.example.com/manage/x\r\n"
