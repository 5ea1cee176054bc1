"""The public archive: the posts that were emailed, newest first, and each email as a web page with no
reader's data in it ([site] archive)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, func, select

from .messages import inline_css, notification_context
from .models import Post
from .runtime import Newsletter

PAGE_SIZE = 20
NEWEST_FIRST = (Post.announced_at.desc(), Post.id.desc())


def _emailed() -> ColumnElement[bool]:
    """Posts a send announced: not those the first fetch of the feed marked as already announced."""
    return and_(Post.queued_at.is_not(None), Post.announced_at.is_not(None))


@dataclass(frozen=True)
class ArchivePage:
    posts: list[Post]
    number: int
    pages: int


def page(nl: Newsletter, number: int) -> ArchivePage | None:
    """Page NUMBER (from 1) of the archive; None past the last page (page 1 always exists)."""
    with nl.sessions() as session:
        total = session.scalar(select(func.count()).select_from(Post).where(_emailed())) or 0
        pages = max(1, math.ceil(total / PAGE_SIZE))
        if not 1 <= number <= pages:
            return None
        posts = list(
            session.scalars(
                select(Post).where(_emailed()).order_by(*NEWEST_FIRST).offset((number - 1) * PAGE_SIZE).limit(PAGE_SIZE)
            )
        )
        session.expunge_all()
    return ArchivePage(posts, number, pages)


def post(nl: Newsletter, post_id: int) -> Post | None:
    """An emailed post; None for any other id."""
    with nl.sessions() as session:
        found = session.scalar(select(Post).where(Post.id == post_id, _emailed()))
        session.expunge_all()
    return found


def web_view(nl: Newsletter, emailed: Post) -> str:
    """The HTML of the post's email as readers got it, with the footer that names no reader."""
    html = nl.render(
        "email/notification.html", **notification_context(nl.config, emailed), unsubscribe_url=None, web_view=True
    )
    return inline_css(html)
