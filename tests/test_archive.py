"""The public archive over real HTTP: what was emailed, as it was emailed, with no reader's data."""

from __future__ import annotations

import re
from datetime import timedelta

import feedparser
import pytest

from newsletter.models import Post, utcnow

from .conftest import publish


def announce(run, feed, smtp, *titles: str) -> None:
    """A reader, then each title published to the blog and announced by `newsletter send`."""
    assert run("subscribers", "add", "reader@example.com", "--confirmed").exit_code == 0
    for title in titles:
        publish(feed, title, title.lower().replace(" ", "-"), "<p>Words about it.</p>")
        result = run("send")
        assert result.exit_code == 0 and "0 failed" in result.output, result.output


def test_the_archive_lists_what_was_emailed_and_shows_it_without_reader_data(site, run, feed, smtp) -> None:
    assert run("posts", "fetch").exit_code == 0  # the blog's existing posts: never emailed, not archived
    announce(run, feed, smtp, "Nets mended", "Gulls return")
    listing = site.get("/archive")
    assert listing.status_code == 200
    titles = re.findall(r'<a href="/archive/(\d+)">([^<]+)</a>', listing.text)
    assert [title for _, title in titles] == ["Gulls return", "Nets mended"]
    assert "Welcome to Harbour Notes" not in listing.text

    post_id = titles[0][0]
    page = site.get(f"/archive/{post_id}")
    assert page.status_code == 200 and "Gulls return" in page.text and "Words about it." in page.text
    [email] = [m for m in smtp.to("reader@example.com") if m.message["Subject"] == "Gulls return"]
    token = re.search(r"/unsubscribe/([\w.-]+)", email.raw.decode()).group(1)
    assert "reader@example.com" not in page.text and token not in page.text and "/unsubscribe/" not in page.text
    assert "'unsafe-inline'" in page.headers["Content-Security-Policy"]  # the email's inline styles apply
    assert "script-src" not in page.headers["Content-Security-Policy"]  # default-src 'none' covers scripts

    atom = feedparser.parse(site.get("/archive.xml").content)
    assert not atom.bozo, atom.bozo_exception
    assert [entry.title for entry in atom.entries] == ["Gulls return", "Nets mended"]
    assert atom.entries[0].link == f"https://news.example.com/archive/{post_id}"


def test_the_archive_pages_and_refuses_what_is_not_there(site, nl) -> None:
    with nl.sessions.begin() as session:
        for i in range(25):
            at = utcnow() - timedelta(hours=25 - i)
            session.add(
                Post(guid=f"p{i}", url=f"https://blog.example/{i}/", title=f"Post {i}", queued_at=at, announced_at=at)
            )
    first, second = site.get("/archive"), site.get("/archive?page=2")
    assert first.text.count('<a href="/archive/') == 20 and "Post 24" in first.text and "Older" in first.text
    assert second.text.count('<a href="/archive/') == 5 and "Post 0" in second.text and "Newer" in second.text
    for path in ["/archive?page=3", "/archive?page=0", "/archive?page=x", "/archive/9999", "/archive/abc"]:
        assert site.get(path).status_code == 404, path


@pytest.fixture
def archive_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEWSLETTER_SITE__ARCHIVE", "false")


def test_no_archive_when_the_owner_turns_it_off(archive_off, site) -> None:
    for path in ["/archive", "/archive/1", "/archive.xml"]:
        assert site.get(path).status_code == 404, path
