"""Read the blog's RSS or Atom feed and record its posts."""

from __future__ import annotations

import calendar
import logging
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urljoin, urlsplit

import feedparser
from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Post, utcnow
from .sanitize import clean_html
from .text import header_text, strip_controls

log = logging.getLogger(__name__)

MAX_FEED_BYTES = 20 * 1024 * 1024


class FeedError(Exception):
    """The feed cannot be fetched or parsed; the message is one line."""


@dataclass(frozen=True)
class Entry:
    guid: str
    url: str
    title: str
    summary_html: str
    published_at: datetime | None


def read_feed(source: str, timeout: float = 30.0) -> list[Entry]:
    """Entries of the feed at SOURCE (an http(s) URL or a local file), oldest first."""
    if not source:
        raise FeedError("[site] feed_url is not set; set it to your blog's RSS or Atom feed")
    data = _fetch(source, timeout)
    parsed = feedparser.parse(
        data, response_headers={"content-location": source}, sanitize_html=False, resolve_relative_uris=True
    )
    if parsed.bozo and not parsed.entries and not parsed.feed.get("title"):
        raise FeedError(f"{source} is not an RSS or Atom feed ({parsed.get('bozo_exception', 'unreadable')})")
    base = parsed.feed.get("link") or source
    entries = []
    for item in parsed.entries:
        link = strip_controls(item.get("link") or "")
        url = urljoin(base, link) if link else ""
        guid = strip_controls(item.get("id") or "") or url
        if not guid or not url:
            continue
        if urlsplit(url).scheme.lower() not in ("http", "https"):
            name = header_text(item.get("title") or "", 200) or guid[:200]
            log.warning("feed entry %r skipped: its link %r is not an http(s) URL", name, url[:200])
            continue
        entries.append(
            Entry(
                guid=guid[:2048],
                url=url[:2048],
                title=header_text(item.get("title") or "", 1024) or header_text(url, 1024),
                summary_html=clean_html(_summary(item), base_url=url),
                published_at=_published(item),
            )
        )
    return sorted(entries, key=lambda e: e.published_at or datetime.min.replace(tzinfo=UTC))


def _fetch(source: str, timeout: float) -> bytes:
    scheme = urlsplit(source).scheme
    try:
        if scheme in ("http", "https"):
            request = urllib.request.Request(source, headers={"User-Agent": "newsletter feed reader"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read(MAX_FEED_BYTES)
        return Path(source.removeprefix("file://")).read_bytes()
    except (URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise FeedError(f"cannot fetch the feed {source}: {reason}") from None


def _summary(item: feedparser.FeedParserDict) -> str:
    if item.get("summary"):
        return item["summary"]
    for content in item.get("content", []):
        if content.get("value"):
            return content["value"]
    return ""


def _published(item: feedparser.FeedParserDict) -> datetime | None:
    parsed = item.get("published_parsed") or item.get("updated_parsed")
    return datetime.fromtimestamp(calendar.timegm(parsed), UTC) if parsed else None


def record_entries(session: Session, entries: list[Entry], announce_existing: bool = False) -> list[Post]:
    """Store entries not seen before; on the very first fetch they count as already announced."""
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
            source="feed",
            announced_at=now if first_fetch and not announce_existing else None,
        )
        session.add(post)
        new.append(post)
    session.flush()
    return new


def new_entries(session: Session, entries: list[Entry]) -> list[Entry]:
    known = set(session.scalars(select(Post.guid).where(Post.guid.in_([e.guid for e in entries]))))
    return [e for e in entries if e.guid not in known]
