"""The blog's posts: recorded from its feed or added by hand, listed, and previewed before a send."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from . import db, digests
from .feeds import new_entries, read_feed, record_entries
from .messages import notification_template
from .models import Delivery, DeliveryStatus, Post, Status, Subscriber, utcnow
from .runtime import Newsletter
from .sanitize import clean_html, plain_to_html
from .text import header_text

MAX_URL = 2048
_NOT_IN_URL = re.compile(r"[\x00-\x20\x7f]")
NEWEST_FIRST = (Post.published_at.desc().nulls_last(), Post.id.desc())
PREVIEW_RECIPIENT = "reader@example.com"
PREVIEW_SUBSCRIBER = 0  # no reader has it: its unsubscribe link shows the page and changes nothing


class InvalidPost(ValueError):
    """A post given by hand that cannot be announced; the message names the option and what to fix."""


class PostError(LookupError):
    """A post ID that names no post, or a post in a state the command cannot change; the message says which."""


@dataclass(frozen=True)
class Preview:
    """What `send` would do now."""

    titles: list[str]
    first_fetch: int  # entries a first fetch of the feed would mark as already announced
    recipients: int


def fetch_feed(nl: Newsletter, announce_existing: bool = False) -> list[Post]:
    """Record the feed's new entries; raises FeedError when it cannot be read."""
    entries = read_feed(nl.config.site.feed_url)
    approval = nl.config.site.require_approval
    try:
        with nl.sessions.begin() as session:
            return record_entries(session, entries, announce_existing, needs_approval=approval)
    except IntegrityError:  # another sender recorded the same entries a moment ago
        with nl.sessions.begin() as session:
            return record_entries(session, entries, announce_existing, needs_approval=approval)


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


def get_post(nl: Newsletter, post_id: int) -> Post:
    with nl.sessions() as session:
        post = session.get(Post, post_id)
    if post is None:
        raise PostError(f"there is no post {post_id}; `newsletter posts list` shows them")
    return post


def render_notification(nl: Newsletter, post_id: int) -> bytes:
    """The email a reader gets about the post (RFC 5322), with links for no reader: they change nothing."""
    template = notification_template(nl.config, nl.render, get_post(nl, post_id))
    return template.render(
        PREVIEW_RECIPIENT,
        template.new_message_id(),
        nl.unsubscribe_url(PREVIEW_SUBSCRIBER),
        nl.manage_url(PREVIEW_SUBSCRIBER),
    )


def approve_post(nl: Newsletter, post_id: int) -> Post:
    """Let the next send announce a post that awaits approval."""
    with nl.sessions.begin() as session:
        post = session.get(Post, post_id)
        if post is None:
            raise PostError(f"there is no post {post_id}; `newsletter posts list` shows them")
        if post.state != "awaiting approval":
            raise PostError(f"post {post_id} is {post.state}, not awaiting approval")
        post.approved_at = utcnow()
    return post


def skip_post(nl: Newsletter, post_id: int) -> tuple[Post, int]:
    """Mark a post not yet sent as never to be sent, stopping the deliveries it still had (returns how many)."""
    with nl.sessions.begin() as session:
        digests.lock(session.connection())
        post = session.scalar(db.locked(select(Post).where(Post.id == post_id), nl.engine))
        if post is None:
            raise PostError(f"there is no post {post_id}; `newsletter posts list` shows them")
        if post.state in ("announced", "skipped"):
            raise PostError(f"post {post_id} is {post.state} already; nothing to skip")
        unsent = Delivery.status.in_([DeliveryStatus.PENDING, DeliveryStatus.WAITING])
        stop = update(Delivery).where(Delivery.post_id == post_id, unsent).values(status=DeliveryStatus.SKIPPED)
        stopped = session.connection().execute(stop).rowcount
        now = utcnow()
        post.skipped_at, post.announced_at, post.queued_at = now, now, None
    return post, stopped


def preview(nl: Newsletter, fetch: bool) -> Preview:
    """The posts a send would announce (reading the feed too when FETCH; FeedError when it cannot)."""
    with nl.sessions() as session:
        unsent = select(Post).where(Post.announced_at.is_(None)).order_by(Post.id)
        titles = [p.title for p in session.scalars(unsent) if p.state in ("new", "sending")]
        first_fetch = 0
        if fetch:
            entries = read_feed(nl.config.site.feed_url)
            first = session.scalar(select(Post.id).where(Post.source == "feed").limit(1)) is None
            fresh = new_entries(session, entries)
            if first and fresh:
                first_fetch = len(fresh)
            elif not nl.config.site.require_approval:
                titles += [e.title for e in fresh]
        on_instant = (Subscriber.status == Status.CONFIRMED, Subscriber.frequency == "instant")
        recipients = session.scalar(select(func.count()).select_from(Subscriber).where(*on_instant)) or 0
    return Preview(titles, first_fetch, recipients)
