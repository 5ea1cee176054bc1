"""Post categories: which posts are never mailed ([site] exclude_categories), which categories readers may
choose ([site] categories, else every one seen in the feed), and which readers a post reaches.

Categories are compared casefolded with their spaces collapsed, so "Boat Trips" and "boat  trips" are one.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import ColumnElement, delete, exists, insert, or_, select, true
from sqlalchemy.orm import Session

from .config import Config
from .models import SUBSCRIBER_CATEGORIES, Post, Subscriber
from .runtime import Newsletter


def key(name: str) -> str:
    return " ".join(name.split()).casefold()


def excluded(config: Config, categories: Iterable[str] | None) -> bool:
    """Whether a post in CATEGORIES is never mailed."""
    unwanted = {key(name) for name in config.site.exclude_categories}
    return any(key(name) in unwanted for name in categories or ())


def available(nl: Newsletter, session: Session) -> list[str]:
    """The categories a reader may choose, by the names the owner or the feed gives them, sorted."""
    if nl.config.site.categories:
        names = list(nl.config.site.categories)
    else:
        names = [name for categories in session.scalars(select(Post.categories)) for name in categories or ()]
    unwanted = {key(name) for name in nl.config.site.exclude_categories}
    by_key: dict[str, str] = {}
    for name in names:
        if key(name) and key(name) not in unwanted:
            by_key.setdefault(key(name), " ".join(name.split()))
    return sorted(by_key.values(), key=key)


def chosen(session: Session, subscriber_id: int) -> set[str]:
    """The keys of the categories a reader chose; empty when they take every post."""
    rows = select(SUBSCRIBER_CATEGORIES.c.category).where(SUBSCRIBER_CATEGORIES.c.subscriber_id == subscriber_id)
    return set(session.scalars(rows))


def choose(session: Session, nl: Newsletter, subscriber_id: int, names: Iterable[str]) -> set[str]:
    """A reader's choice of categories, among those available (others are ignored); none means every post.
    Returns the keys now chosen."""
    offered = {key(name) for name in available(nl, session)}
    keys = {key(name) for name in names} & offered
    session.execute(delete(SUBSCRIBER_CATEGORIES).where(SUBSCRIBER_CATEGORIES.c.subscriber_id == subscriber_id))
    if keys:
        session.execute(
            insert(SUBSCRIBER_CATEGORIES), [{"subscriber_id": subscriber_id, "category": k} for k in sorted(keys)]
        )
    return keys


def readers_of(session: Session, categories: Iterable[str] | None) -> ColumnElement[bool]:
    """Subscribers a post in CATEGORIES reaches: those who chose none, and those who chose one of them."""
    if not session.scalar(select(exists(SUBSCRIBER_CATEGORIES.select()))):
        return true()
    mine = SUBSCRIBER_CATEGORIES.c.subscriber_id == Subscriber.id
    keys = [key(name) for name in categories or ()]
    return or_(
        ~exists().where(mine),
        exists().where(mine, SUBSCRIBER_CATEGORIES.c.category.in_(keys)),
    )
