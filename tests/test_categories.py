"""Categories: excluded ones are never mailed, and a reader who chose some gets only posts in them, as
instant email and in digests alike."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from sqlalchemy import select

from newsletter import categories
from newsletter.models import Post, Subscriber

from .test_digests import at, inbox, reader, send
from .test_manage import reader_row


@pytest.fixture
def extra_config() -> str:
    return '[digest]\nsend_hour = 8\ntimezone = "UTC"\n'


def publish(nl, title: str, when, *names: str) -> None:
    with nl.sessions.begin() as session:
        session.add(
            Post(
                guid=title, url=f"https://blog.example/{title}/", title=title, published_at=when, categories=list(names)
            )
        )


def pick(nl, address: str, *names: str) -> set[str]:
    with nl.sessions.begin() as session:
        subscriber = session.scalars(select(Subscriber).where(Subscriber.email_key == address)).one()
        return categories.choose(session, nl, subscriber.id, names)


def test_readers_get_only_the_categories_they_chose(nl, memory) -> None:
    reader(nl, "all@example.com", "instant")
    reader(nl, "fish@example.com", "instant")
    reader(nl, "weather@example.com", "daily")
    publish(nl, "seed", at(-1, 0), "Fishing", "Weather")  # so that both categories are on offer
    assert pick(nl, "fish@example.com", "fishing") == {"fishing"}
    assert pick(nl, "weather@example.com", "Weather", "Not offered") == {"weather"}
    send(nl, at(0, 0))
    inbox(memory)

    publish(nl, "catch", at(0, 1), "Fishing")
    publish(nl, "storm", at(0, 2), "Weather", "Harbour")
    publish(nl, "plain", at(0, 3))
    send(nl, at(0, 4))
    assert sorted((to, titles[0]) for to, _, titles in inbox(memory)) == [
        ("all@example.com", "catch"),
        ("all@example.com", "plain"),
        ("all@example.com", "storm"),
        ("fish@example.com", "catch"),
    ]
    send(nl, at(0, 9))
    assert [(to, titles) for to, _, titles in inbox(memory)] == [("weather@example.com", ["storm"])]


def test_changing_categories_never_sends_a_post_again(nl, memory) -> None:
    reader(nl, "reader@example.com", "instant")
    publish(nl, "catch", at(0, 1), "Fishing")
    send(nl, at(0, 2))
    assert len(inbox(memory)) == 1
    pick(nl, "reader@example.com", "Fishing")
    send(nl, at(0, 3))
    pick(nl, "reader@example.com")
    send(nl, at(0, 4) + timedelta(minutes=1))
    assert inbox(memory) == []


@pytest.fixture
def personal_excluded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEWSLETTER_SITE__EXCLUDE_CATEGORIES", "Personal, Drafts")


def test_a_post_in_an_excluded_category_is_never_mailed_nor_offered(personal_excluded, nl, memory) -> None:
    reader(nl, "now@example.com", "instant")
    reader(nl, "day@example.com", "daily")
    publish(nl, "holiday snaps", at(0, 1), "Travel", "personal")
    publish(nl, "catch", at(0, 2), "Fishing")
    report = send(nl, at(0, 9))
    assert report.posts == 1
    assert sorted((to, titles) for to, _, titles in inbox(memory)) == [
        ("day@example.com", ["catch"]),
        ("now@example.com", ["catch"]),
    ]
    with nl.sessions() as session:
        held_back = session.scalars(select(Post).where(Post.title == "holiday snaps")).one()
        assert held_back.announced_at is not None and held_back.queued_at is None
        assert categories.available(nl, session) == ["Fishing", "Travel"]


@pytest.fixture
def owner_lists_fishing_and_boats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEWSLETTER_SITE__CATEGORIES", "Fishing, Boats")


def test_the_owners_list_of_categories_is_what_readers_may_choose(
    owner_lists_fishing_and_boats, nl, site, memory
) -> None:
    publish(nl, "seed", at(-1, 0), "Fishing", "Weather", "Travel")
    reader(nl, "reader@example.com", "instant")
    send(nl, at(0, 0))
    inbox(memory)
    link = nl.manage_url(reader_row(nl, "reader@example.com").id)
    page = site.get(link).text
    assert re.findall(r'name="categories" value="([^"]*)"', page) == ["Boats", "Fishing"]
    chosen = site.press(link, data={"categories": ["Weather", "Boats"]})  # Weather is not on offer
    assert chosen.status_code == 200 and "You now get posts about Boats." in chosen.text

    publish(nl, "storm", at(0, 1), "Weather")
    publish(nl, "hull", at(0, 2), "Boats")
    send(nl, at(0, 3))
    assert [(to, titles) for to, _, titles in inbox(memory)] == [("reader@example.com", ["hull"])]


RSS_WITH_CATEGORIES = """<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0"><channel><title>Harbour Notes</title><link>https://harbour-notes.example/</link>
<item><title>Old news</title><link>https://harbour-notes.example/old/</link><guid>old</guid>
<pubDate>Mon, 02 Nov 2026 08:00:00 +0000</pubDate></item>
</channel></rss>
"""

NEW_ITEMS = """<item><title>Mackerel season</title><link>https://harbour-notes.example/mackerel/</link><guid>mackerel</guid>
<category>Fishing</category><category domain="https://harbour-notes.example/tags">Boats &amp; Gear</category>
<category>fishing</category><pubDate>Tue, 01 Dec 2026 08:00:00 +0000</pubDate></item>
<item><title>Diary</title><link>https://harbour-notes.example/diary/</link><guid>diary</guid>
<category>Personal</category><pubDate>Tue, 01 Dec 2026 09:00:00 +0000</pubDate></item>
</channel>"""

ATOM_WITH_CATEGORIES = """<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom"><title>Harbour Notes</title><id>urn:harbour</id>
<updated>2026-12-01T08:00:00Z</updated>
<entry><title>Storm</title><id>urn:storm</id><link href="https://harbour-notes.example/storm/"/>
<updated>2026-12-01T08:00:00Z</updated><category term="Weather" label="The weather"/><category term="Harbour"/></entry>
</feed>
"""


def test_feed_categories_reach_the_posts_the_list_and_the_archive(personal_excluded, run, feed, site, smtp) -> None:
    feed.write_text(RSS_WITH_CATEGORIES)
    assert run("posts", "fetch").exit_code == 0
    feed.write_text(RSS_WITH_CATEGORIES.replace("</channel>", NEW_ITEMS))
    assert run("subscribers", "add", "reader@example.com", "--confirmed").exit_code == 0
    sent = run("send")
    assert sent.exit_code == 0 and "1 post(s): 1 sent" in sent.output, sent.output
    listing = run("posts", "list").output
    assert "Mackerel season  <https://harbour-notes.example/mackerel/>  [Fishing, Boats & Gear]" in listing
    assert "Diary  <https://harbour-notes.example/diary/>  [Personal]" in listing
    archive = site.get("/archive").text
    assert "Mackerel season" in archive and "Fishing, Boats &amp; Gear" in archive and "Diary" not in archive

    feed.write_text(ATOM_WITH_CATEGORIES)
    assert run("posts", "fetch").exit_code == 0
    assert "Storm  <https://harbour-notes.example/storm/>  [Weather, Harbour]" in run("posts", "list").output
