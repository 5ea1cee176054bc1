"""The blog's posts: recorded from its feed or added by hand, listed, and previewed before a send."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from .feeds import new_entries, read_feed, record_entries
from .models import Post, Status, Subscriber, utcnow
from .runtime import Newsletter
from .sanitize import clean_html, plain_to_html
from .text import header_text

MAX_URL = 2048
_NOT_IN_URL = re.compile(r"[\x00-\x20\x7f]")
NEWEST_FIRST = (Post.published_at.desc().nulls_last(), Post.id.desc())


class InvalidPost(ValueError):
    """A post given by hand that cannot be announced; the message names the option and what to fix."""


@dataclass(frozen=True)
class Preview:
    """What `send` would do now."""

    titles: list[str]
    first_fetch: int  # entries a first fetch of the feed would mark as already announced
    recipients: int


def fetch_feed(nl: Newsletter, announce_existing: bool = False) -> list[Post]:
    """Record the feed's new entries; raises FeedError when it cannot be read."""
    entries = read_feed(nl.config.site.feed_url)
    try:
        with nl.sessions.begin() as session:
            return record_entries(session, entries, announce_existing)
    except IntegrityError:  # another sender recorded the same entries a moment ago
        with nl.sessions.begin() as session:
            return record_entries(session, entries, announce_existing)


def add_post(nl: Newsletter, title: str, url: str, summary: str = "") -> Post:
    """A post given by hand (SUMMARY as plain text or HTML), announced by the next send."""
    for option, value in (("--title", title), ("--url", url), ("--summary", summary)):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidPost(f"{option} is not valid text in this terminal's encoding (UTF-8)") from None
    if not url.startswith(("https://", "http://")) or len(url) > MAX_URL or _NOT_IN_URL.search(url):
        raise InvalidPost(f"--url must be an http(s) URL of at most {MAX_URL} characters without spaces, not {url!r}")
    if not header_text(title):
        raise InvalidPost("--title must not be empty")
    summary = summary.replace("\x00", "")
    html = clean_html(summary, base_url=url) if "<" in summary else plain_to_html(summary)
    with nl.sessions.begin() as session:
        if session.scalar(select(Post.id).where(Post.guid == url)):
            raise InvalidPost(f"a post with the URL {url} already exists")
        post = Post(
            guid=url,
            url=url,
            title=header_text(title, 1024),
            summary_html=html,
            source="manual",
            published_at=utcnow(),
        )
        session.add(post)
    return post


def all_posts(nl: Newsletter) -> list[Post]:
    """Every post, newest first."""
    with nl.sessions() as session:
        return list(session.scalars(select(Post).order_by(*NEWEST_FIRST)))


def latest_post(nl: Newsletter) -> Post | None:
    with nl.sessions() as session:
        return session.scalar(select(Post).order_by(*NEWEST_FIRST).limit(1))


def preview(nl: Newsletter, fetch: bool) -> Preview:
    """The posts a send would announce (reading the feed too when FETCH; FeedError when it cannot)."""
    with nl.sessions() as session:
        titles = [p.title for p in session.scalars(select(Post).where(Post.announced_at.is_(None)).order_by(Post.id))]
        first_fetch = 0
        if fetch:
            entries = read_feed(nl.config.site.feed_url)
            first = session.scalar(select(Post.id).where(Post.source == "feed").limit(1)) is None
            fresh = new_entries(session, entries)
            if first and fresh:
                first_fetch = len(fresh)
            else:
                titles += [e.title for e in fresh]
        on_instant = (Subscriber.status == Status.CONFIRMED, Subscriber.frequency == "instant")
        recipients = session.scalar(select(func.count()).select_from(Subscriber).where(*on_instant)) or 0
    return Preview(titles, first_fetch, recipients)
