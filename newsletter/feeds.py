"""Read the blog's RSS or Atom feed and record its posts."""

from __future__ import annotations

import calendar
import html
import logging
import re
import urllib.request
import xml.sax
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parseaddr
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urljoin, urlsplit
from xml.parsers import expat

import feedparser
from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Post, utcnow
from .sanitize import clean_html, html_to_line
from .text import header_text, hide_password, strip_controls

log = logging.getLogger(__name__)

MAX_FEED_BYTES = 20 * 1024 * 1024
HTML_TYPES = ("text/html", "application/xhtml+xml")
MAX_CATEGORY = 200  # subscriber_categories.category holds as much
MAX_CATEGORIES = 50
MAX_AUTHOR = 200
FIRST_IMAGE = re.compile(r'<img\b[^>]*?\ssrc="([^"]+)"')
_UNSAFE_URL = re.compile(r'[\s"<>\\]')
_XML_DECLARATION = re.compile(r"\A\s*<\?xml\b[^>]*\?>")
_NOT_XML_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_HTML_PAGE = re.compile(r"<(?:!doctype\s+)?html[\s>]", re.IGNORECASE)


class FeedError(Exception):
    """The feed cannot be fetched or parsed; the message is one line."""


@dataclass(frozen=True)
class Entry:
    guid: str
    url: str
    title: str
    summary_html: str
    published_at: datetime | None
    categories: tuple[str, ...] = ()
    author: str = ""
    image_url: str = ""  # the featured image
    content_html: str = ""  # the whole post, when the feed carries more than the summary


def read_feed(source: str, timeout: float = 30.0) -> list[Entry]:
    """Entries of the feed at SOURCE (an http(s) URL or a local file), oldest first."""
    if not source:
        raise FeedError("[site] feed_url is not set; set it to your blog's RSS or Atom feed")
    data = _fetch(source, timeout)
    if len(data) > MAX_FEED_BYTES:
        raise FeedError(f"the feed at {hide_password(source)} is larger than {MAX_FEED_BYTES // 2**20} MiB")
    parsed = feedparser.parse(
        data, response_headers={"content-location": source}, sanitize_html=False, resolve_relative_uris=True
    )
    problem = _problem(data, parsed)
    if problem:
        raise FeedError(f"the feed at {hide_password(source)} {problem}")
    base = parsed.feed.get("link") or source
    entries = []
    for item in parsed.entries:
        link = strip_controls(item.get("link") or "")
        url = urljoin(base, link) if link else ""
        guid = strip_controls(item.get("id") or "") or url
        if not guid or not url:
            continue
        title = header_text(_title(item), 1024)
        if urlsplit(url).scheme.lower() not in ("http", "https"):
            name = title[:200] or guid[:200]
            log.warning("feed entry %r skipped: its link %r is not an http(s) URL", name, url[:200])
            continue
        entries.append(
            Entry(
                guid=guid[:2048],
                url=url[:2048],
                title=title or header_text(url, 1024),
                summary_html=clean_html(_summary(item), base_url=url),
                published_at=_published(item),
                categories=_categories(item),
                author=header_text(_author(item), MAX_AUTHOR),
                image_url=_image(item, url),
                content_html=clean_html(_content(item), base_url=url),
            )
        )
    return sorted(entries, key=lambda e: e.published_at or datetime.min.replace(tzinfo=UTC))


def _problem(data: bytes, parsed: feedparser.FeedParserDict) -> str | None:
    """What makes DATA unusable as a feed, as the end of a sentence, or None when it is a feed."""
    if not data.strip():
        return "is empty"
    broken = _not_well_formed(data, parsed)
    if not parsed.get("version"):
        if _HTML_PAGE.search(data[:4096].decode("latin-1")):
            return "is an HTML page, not an RSS or Atom feed"
        if not broken:
            return "is not an RSS or Atom feed"
    return f"is not well-formed XML ({broken})" if broken else None


def _not_well_formed(data: bytes, parsed: feedparser.FeedParserDict) -> str | None:
    """Where the XML of DATA is broken ("line 40: unclosed token"), or None.

    feedparser's strict parse also stops at HTML entities (`&nbsp;`), undeclared namespace prefixes,
    blank lines before the XML declaration and stray control characters (which every field drops), all of
    which its loose parser reads faithfully, so a document it could not parse strictly is checked again
    without those rules.
    """
    if not isinstance(parsed.get("bozo_exception"), xml.sax.SAXParseException):
        return None
    text = data.decode(parsed.get("encoding") or "utf-8", "replace").removeprefix("\ufeff")
    text = _XML_DECLARATION.sub(lambda m: re.sub(r"[^\n]", " ", m[0]), text, count=1)
    text = _NOT_XML_CHARACTERS.sub(" ", text)
    checker = expat.ParserCreate()
    checker.UseForeignDTD(True)
    try:
        checker.Parse(text, True)
    except expat.ExpatError as exc:
        reason = expat.errors.messages[exc.code].removeprefix("not well-formed (").removesuffix(")")
        return f"line {exc.lineno}: {reason}"
    return None


def _title(item: feedparser.FeedParserDict) -> str:
    """The entry's title as plain text: what a reader sees, whether the feed typed it as text or HTML."""
    title = item.get("title") or ""
    if item.get("title_detail", {}).get("type") in HTML_TYPES:
        return html_to_line(title)
    return title


def _fetch(source: str, timeout: float) -> bytes:
    scheme = urlsplit(source).scheme
    try:
        if scheme in ("http", "https"):
            request = urllib.request.Request(source, headers={"User-Agent": "newsletter feed reader"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read(MAX_FEED_BYTES + 1)
        return Path(source.removeprefix("file://")).read_bytes()
    except (URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise FeedError(f"cannot fetch the feed {source}: {reason}") from None


def _categories(item: feedparser.FeedParserDict) -> tuple[str, ...]:
    """The entry's categories (RSS <category>, Atom <category term>; feedparser calls them tags), each one
    line of plain text, in order, without repeats."""
    names: dict[str, str] = {}
    for tag in item.get("tags") or ():
        name = header_text(strip_controls(tag.get("term") or tag.get("label") or ""), MAX_CATEGORY)
        if name:
            names.setdefault(name.casefold(), name)
    return tuple(names.values())[:MAX_CATEGORIES]


def _summary(item: feedparser.FeedParserDict) -> str:
    return item.get("summary") or _content(item)


def _content(item: feedparser.FeedParserDict) -> str:
    for content in item.get("content", []):
        if content.get("value"):
            return content["value"]
    return ""


def _author(item: feedparser.FeedParserDict) -> str:
    """The author's name. RSS <author> is an address, often with the name ("ada@blog.example (Ada)"), which
    feedparser splits with a pattern that misreads long top-level domains, so that form is read here; an
    address alone names no one. dc:creator and Atom's <name> are names."""
    written = strip_controls(item.get("author") or "")
    name, address = parseaddr(written)
    if "@" in address and address in written:
        return name
    detail = item.get("author_detail") or {}
    return strip_controls(detail.get("name") or written)


def _image(item: feedparser.FeedParserDict, base: str) -> str:
    """The featured image: media:content, media:thumbnail, an image enclosure, else the first <img> of the
    post, as an absolute http(s) URL; empty when there is none."""
    candidates = [
        m.get("url")
        for m in item.get("media_content") or ()
        if m.get("medium", "image") == "image" and m.get("type", "image/").startswith("image/")
    ]
    candidates += [m.get("url") for m in item.get("media_thumbnail") or ()]
    candidates += [e.get("href") for e in item.get("enclosures") or () if (e.get("type") or "").startswith("image/")]
    candidates += FIRST_IMAGE.findall(clean_html(_content(item) or _summary(item), base_url=base))[:1]
    for candidate in candidates:
        src = urljoin(base, html.unescape(strip_controls(candidate or "")).strip())
        if urlsplit(src).scheme.lower() in ("http", "https") and len(src) <= 2048 and not _UNSAFE_URL.search(src):
            return src
    return ""


def _published(item: feedparser.FeedParserDict) -> datetime | None:
    parsed = item.get("published_parsed") or item.get("updated_parsed")
    return datetime.fromtimestamp(calendar.timegm(parsed), UTC) if parsed else None


def record_entries(
    session: Session, entries: list[Entry], announce_existing: bool = False, needs_approval: bool = False
) -> list[Post]:
    """Store entries not seen before; on the very first fetch they count as already announced. With
    NEEDS_APPROVAL the others wait for `posts approve`."""
    first_fetch = session.scalar(select(Post.id).where(Post.source == "feed").limit(1)) is None
    known = set(session.scalars(select(Post.guid).where(Post.guid.in_([e.guid for e in entries]))))
    now = utcnow()
    new = []
    for entry in entries:
        if entry.guid in known:
            continue
        known.add(entry.guid)
        post = Post(
            guid=entry.guid,
            url=entry.url,
            title=entry.title,
            summary_html=entry.summary_html,
            published_at=entry.published_at,
            categories=list(entry.categories),
            author=entry.author,
            image_url=entry.image_url,
            content_html=entry.content_html,
            source="feed",
            announced_at=now if first_fetch and not announce_existing else None,
            needs_approval=needs_approval,
        )
        session.add(post)
        new.append(post)
    session.flush()
    return new


def new_entries(session: Session, entries: list[Entry]) -> list[Entry]:
    known = set(session.scalars(select(Post.guid).where(Post.guid.in_([e.guid for e in entries]))))
    return [e for e in entries if e.guid not in known]
