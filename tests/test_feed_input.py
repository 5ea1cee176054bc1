"""What the blog's feed puts in front of readers: titles typed as HTML, and feeds that are not feeds."""

from __future__ import annotations

import html
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import Result
from sqlalchemy import select

from newsletter.models import Post

from .conftest import FEEDS, publish
from .test_cli import failure, newsletter, ok

Run = Callable[..., Result]
ATOM_TITLES = ["Bold move", "AT&T and Don’t", "Fish & chips < 5 euros", "Writing &amp; in HTML <3"]


class _Headings(HTMLParser):
    """The text of the <title> and <h1> elements of an HTML document."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.texts: dict[str, str] = {}
        self.open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("title", "h1"):
            self.open = tag
            self.texts[tag] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == self.open:
            self.open = None

    def handle_data(self, data: str) -> None:
        if self.open:
            self.texts[self.open] += data


def headings(document: str) -> dict[str, str]:
    parser = _Headings()
    parser.feed(document)
    return {tag: " ".join(text.split()) for tag, text in parser.texts.items()}


def assert_reads_as(note, title: str) -> None:
    """The email shows TITLE, as plain text, in its Subject, its text part and its HTML part."""
    assert note.message["Subject"] == title
    assert title in note.text.splitlines()
    assert headings(note.html) == {"title": title, "h1": title}
    if "&amp;" not in title:
        assert "&amp;amp;" not in note.html and "&amp;#" not in note.html


def announced(result: Result) -> list[str]:
    """The titles a dry run says it would announce."""
    prefix = "would announce: "
    return [line.removeprefix(prefix) for line in ok(result).splitlines() if line.startswith(prefix)]


def use_feed(config_file: Path, feed: Path, source: str) -> None:
    config_file.write_text(config_file.read_text().replace(f'feed_url = "{feed}"', f'feed_url = "{source}"'))


# ---- titles ---------------------------------------------------------------------------------------


def test_rss_titles_with_entities_reach_the_reader_as_plain_text(site, smtp, run: Run, feed: Path) -> None:
    run("subscribers", "add", "reader@example.com", "--confirmed")
    ok(run("posts", "fetch"))
    titles = {
        "Don&#8217;t panic &amp; carry on": "Don’t panic & carry on",
        "AT&amp;amp;T": "AT&T",
        "&lt;b&gt;Bold&lt;/b&gt; move": "Bold move",
        "&amp;#8220;Quoted&amp;#8221; twice": "“Quoted” twice",
        "Escaped once too often: don&amp;amp;#8217;t": "Escaped once too often: don’t",
    }
    for number, raw in enumerate(titles):
        publish(feed, raw, f"post-{number}")

    assert set(announced(run("send", "--dry-run"))) == set(titles.values())
    assert "5 sent" in ok(run("send"))
    notes = {m.message["Subject"]: m for m in smtp.to("reader@example.com")}
    assert set(notes) == set(titles.values())
    for title in titles.values():
        assert_reads_as(notes[title], title)
    listed = ok(run("posts", "list"))
    assert all(f"  {title}  <" in listed for title in titles.values())
    assert "&amp;" not in listed and "&#" not in listed and "<b>" not in listed

    archive = site.get("/archive").text
    pages = {html.unescape(title): post for post, title in re.findall(r'<a href="/archive/(\d+)">([^<]+)</a>', archive)}
    assert set(pages) == set(titles.values())
    assert "&amp;amp;" not in archive and "&amp;#" not in archive
    for title, post in pages.items():
        page = site.get(f"/archive/{post}").text
        assert headings(page) == {"title": title, "h1": title}
        assert "&amp;amp;" not in page and "&amp;#" not in page


def test_atom_html_and_xhtml_titles_reach_the_reader_as_plain_text(
    nl, smtp, run: Run, config_file: Path, feed: Path
) -> None:
    use_feed(config_file, feed, str(FEEDS / "html-titles-atom.xml"))
    run("subscribers", "add", "reader@example.com", "--confirmed")
    assert ok(run("posts", "fetch", "--announce-existing")).strip() == "4 new post(s)"

    assert announced(run("send", "--dry-run", "--no-fetch")) == ATOM_TITLES
    assert "4 sent" in ok(run("send", "--no-fetch"))
    notes = {m.message["Subject"]: m for m in smtp.to("reader@example.com")}
    assert set(notes) == set(ATOM_TITLES)
    for title in ATOM_TITLES:
        assert_reads_as(notes[title], title)
    assert "Writing &amp;amp; in HTML &lt;3</a>" in notes["Writing &amp; in HTML <3"].html
    listed = ok(run("posts", "list"))
    assert [line.split("  ")[-2] for line in listed.splitlines()] == ATOM_TITLES[::-1]


# ---- feeds that are not feeds ---------------------------------------------------------------------


@dataclass
class Served:
    """A feed served over HTTP on 127.0.0.1: what the server answers can change between requests."""

    url: str
    body: bytes = b""
    content_type: str = "application/rss+xml; charset=utf-8"


@pytest.fixture
def served() -> Iterator[Served]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", state.content_type)
            self.send_header("Content-Length", str(len(state.body)))
            self.end_headers()
            self.wfile.write(state.body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = Served(f"http://127.0.0.1:{server.server_address[1]}/feed/")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def truncated(feed: bytes) -> bytes:
    """FEED cut off in the middle of its second item, as a half-written file or a dropped connection leaves it."""
    second = feed.index(b"<item>", feed.index(b"</item>"))
    return feed[: feed.index(b"<link>", second) + 3]


HTML_ERROR_PAGE = b"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>502 Bad Gateway</title></head>
<body><h1>Bad Gateway</h1><p>The upstream server is down.<br>Try again later.</p></body></html>
"""
OPML = b'<?xml version="1.0"?>\n<opml version="2.0"><head/><body><outline text="Blogs"/></body></opml>\n'
BROKEN = {
    "truncated": (truncated, r"is not well-formed XML \(line {line}: unclosed token\)", b"<li"),
    "an HTML error page": (lambda feed: HTML_ERROR_PAGE, r"is an HTML page, not an RSS or Atom feed", None),
    "an empty body": (lambda feed: b"", r"is empty", None),
    "blank": (lambda feed: b"\n  \n", r"is empty", None),
    "a bare ampersand": (
        lambda feed: feed.replace(b"<title>Salt", b"<title>Salt & pepper", 1),
        r"is not well-formed XML \(line {line}: invalid token\)",
        b"Salt &",
    ),
    "well-formed but not a feed": (lambda feed: OPML, r"is not an RSS or Atom feed", None),
    "over 20 MiB": (
        lambda feed: feed.replace(b"<channel>", b"<channel><!--" + b" " * 20 * 2**20 + b"-->", 1),
        r"is larger than 20 MiB",
        None,
    ),
}


@pytest.mark.parametrize("where", ["file", "http"])
@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_feed_that_is_not_well_formed_is_an_error_and_nothing_is_recorded_or_sent(
    nl, smtp, run: Run, config_file: Path, feed: Path, served: Served, kind: str, where: str
) -> None:
    run("subscribers", "add", "reader@example.com", "--confirmed")
    ok(run("posts", "fetch"))
    before = ok(run("posts", "list"))
    publish(feed, "Salt on the nets", "salt")
    publish(feed, "Wind from the east", "wind")  # the top item: whole even in a truncated copy
    spoil, problem, culprit = BROKEN[kind]
    body = spoil(feed.read_bytes())
    if culprit:
        problem = problem.format(line=body[: body.rindex(culprit)].count(b"\n") + 1)
    if where == "http":
        served.body, source = body, served.url
        use_feed(config_file, feed, source)
    else:
        feed.write_bytes(body)
        source = str(feed)

    for command, outcome in (("send", "nothing was sent"), ("posts", "nothing was recorded")):
        line = failure(newsletter(config_file, *([command, "fetch"] if command == "posts" else [command])))
        assert re.fullmatch(f"Error: the feed at {re.escape(source)} {problem}; {outcome}", line), line
    assert ok(run("posts", "list")) == before
    assert smtp.messages == []


def test_a_half_written_feed_fails_until_it_is_whole_again(nl, smtp, run: Run, feed: Path) -> None:
    run("subscribers", "add", "reader@example.com", "--confirmed")
    ok(run("posts", "fetch"))
    publish(feed, "Salt on the nets", "salt")
    publish(feed, "Wind from the east", "wind")
    whole = feed.read_bytes()
    feed.write_bytes(truncated(whole))
    assert run("send").exit_code == 1

    feed.write_bytes(whole)
    assert "2 post(s): 2 sent" in ok(run("send"))
    assert sorted(smtp.subjects("reader@example.com")) == ["Salt on the nets", "Wind from the east"]


def _wild(feed: bytes) -> bytes:
    """FEED as sloppy publishing software writes it: blank lines first, HTML entities, an undeclared prefix."""
    return b"\n\n" + feed.replace(b"<title>Salt on the nets", b"<title>Salt&nbsp;on the nets&hellip;", 1).replace(
        b"<item>", b'<item><media:thumbnail url="https://harbour-notes.example/salt.jpg"/>', 1
    )


SOUND = {
    "served as text/html": (lambda feed: feed, "text/html; charset=utf-8", "Salt on the nets"),
    "latin-1 bytes in a feed declared UTF-8": (
        lambda feed: feed.replace(b"Salt on the nets", "Salt on the nets für alle".encode("latin-1")),
        "application/rss+xml",
        "Salt on the nets für alle",
    ),
    "blank lines, HTML entities, an undeclared prefix": (_wild, "application/rss+xml", "Salt on the nets…"),
    "control characters pasted into a title": (
        lambda feed: feed.replace(b"Salt on the nets", b"Salt\x0bon the\x00 nets"),
        "application/rss+xml",
        "Salt on the nets",
    ),
}


@pytest.mark.parametrize("kind", list(SOUND))
def test_recoverable_oddities_in_a_sound_feed_are_not_errors(
    nl, smtp, run: Run, config_file: Path, feed: Path, served: Served, kind: str
) -> None:
    run("subscribers", "add", "reader@example.com", "--confirmed")
    ok(run("posts", "fetch"))
    publish(feed, "Salt on the nets", "salt")
    spoil, served.content_type, title = SOUND[kind]
    served.body = spoil(feed.read_bytes())
    use_feed(config_file, feed, served.url)

    assert "1 post(s): 1 sent" in ok(run("send"))
    assert smtp.subjects("reader@example.com") == [title]


@pytest.mark.parametrize("sample", sorted(FEEDS.glob("*.xml")), ids=lambda path: path.name)
def test_every_sample_feed_is_read_whole(nl, run: Run, config_file: Path, feed: Path, sample: Path) -> None:
    use_feed(config_file, feed, str(sample))
    entries = len(re.findall(rb"<(?:item|entry)>", sample.read_bytes()))
    assert entries > 0
    assert ok(run("posts", "fetch", "--announce-existing")).strip() == f"{entries} new post(s)"
    assert len(ok(run("posts", "list")).splitlines()) == entries


# ---- what a notification shows of a post: author, featured image, full content ---------------------


MEDIA_FEED = """<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0" xmlns:media="http://search.yahoo.com/mrss/" xmlns:dc="http://purl.org/dc/elements/1.1/"
  xmlns:content="http://purl.org/rss/1.0/modules/content/">
<channel><title>Harbour Notes</title><link>https://harbour-notes.example/</link><description>Quay news</description>
<item><title>The new crane</title><link>https://harbour-notes.example/2025/04/crane/</link>
<guid>https://harbour-notes.example/2025/04/crane/</guid><pubDate>Thu, 03 Apr 2025 10:00:00 +0000</pubDate>
{tags}
<description><![CDATA[{summary}]]></description>{content}
</item>
</channel></rss>
"""
SITE = "https://harbour-notes.example"
FIRST_IMG = '<p>Up it goes. <img src="/uploads/in-text.jpg" alt=""> <img src="/uploads/second.jpg" alt=""></p>'


def fetched(run: Run, nl, feed: Path, tags: str = "", summary: str = "<p>Up it goes.</p>", content: str = "") -> Post:
    """The post the blog's feed gives with TAGS in its item, after `posts fetch`."""
    encoded = f"<content:encoded><![CDATA[{content}]]></content:encoded>" if content else ""
    feed.write_text(MEDIA_FEED.format(tags=tags, summary=summary, content=encoded), encoding="utf-8")
    assert ok(run("posts", "fetch", "--announce-existing")).strip() == "1 new post(s)"
    with nl.sessions() as session:
        return session.scalars(select(Post)).one()


@pytest.mark.parametrize(
    "tags, summary, image",
    [
        (f'<media:content url="{SITE}/uploads/crane.jpg" medium="image" type="image/jpeg"/>', FIRST_IMG, "crane.jpg"),
        (
            f'<media:content url="{SITE}/uploads/crane.mp4" medium="video" type="video/mp4"/>'
            f'<media:thumbnail url="{SITE}/uploads/thumb.jpg"/>',
            FIRST_IMG,
            "thumb.jpg",
        ),
        (
            f'<enclosure url="{SITE}/uploads/talk.mp3" type="audio/mpeg" length="1"/>'
            f'<enclosure url="{SITE}/uploads/cover.png" type="image/png" length="1"/>',
            FIRST_IMG,
            "cover.png",
        ),
        (f'<enclosure url="{SITE}/uploads/talk.mp3" type="audio/mpeg" length="1"/>', FIRST_IMG, "in-text.jpg"),
        ("", FIRST_IMG, "in-text.jpg"),
        ('<media:thumbnail url="../../../uploads/relative.jpg"/>', "", "relative.jpg"),
        ('<media:content url="javascript:alert(1)" medium="image"/>', FIRST_IMG, "in-text.jpg"),
        ('<media:thumbnail url="data:image/png;base64,iVBORw0KGgo="/>', "<p>No picture.</p>", None),
        ("", '<p><img src="data:image/png;base64,iVBORw0KGgo=" alt=""> <img src="javascript:x"></p>', None),
    ],
    ids=[
        "media:content",
        "media:thumbnail beside a video",
        "image enclosure",
        "first img when the enclosure is audio",
        "first img",
        "relative URL made absolute",
        "javascript: refused",
        "data: refused",
        "no usable image",
    ],
)
def test_the_featured_image_comes_from_the_feed(nl, run: Run, feed: Path, tags: str, summary: str, image) -> None:
    post = fetched(run, nl, feed, tags, summary)
    assert post.image_url == (f"{SITE}/uploads/{image}" if image else "")


@pytest.mark.parametrize(
    "tags, author",
    [
        ("<dc:creator><![CDATA[Ada Quay]]></dc:creator>", "Ada Quay"),
        ("<author>ada@harbour-notes.example (Ada Quay)</author>", "Ada Quay"),
        ("<author>ada@example.com (Ada Quay)</author>", "Ada Quay"),
        ("<author>Ada Quay &lt;ada@harbour-notes.example&gt;</author>", "Ada Quay"),
        ("<author>ada@harbour-notes.example</author>", ""),  # an address names no one
        ("<dc:creator>Ada @ the quay</dc:creator>", "Ada @ the quay"),
        ("", ""),
    ],
)
def test_the_author_comes_from_dc_creator_or_rss_author(nl, run: Run, feed: Path, tags: str, author: str) -> None:
    assert fetched(run, nl, feed, tags).author == author


def test_full_content_is_kept_sanitised_beside_the_summary(nl, run: Run, feed: Path) -> None:
    content = (
        '<p>Up it goes.</p><script>alert(1)</script><p onclick="x()">Then <a href="/plans/">the plans</a>.</p>'
        '<table style="width:1600px"><tr><th>Berth</th><td colspan="2">North</td></tr></table>'
    )
    post = fetched(run, nl, feed, summary="<p>Up it goes.</p>", content=content)
    assert post.summary_html == "<p>Up it goes.</p>"
    assert (
        "<script" not in post.content_html and "alert" not in post.content_html and "onclick" not in post.content_html
    )
    assert f'<a href="{SITE}/plans/" rel="noopener noreferrer">the plans</a>' in post.content_html
    assert '<table><tbody><tr><th>Berth</th><td colspan="2">North</td></tr></tbody></table>' in post.content_html
