"""Every kind of email as a reader sees it: the blog's logo and colour, the post's date, author and featured
image, a real button, and nothing wider than a phone, even for a post built to break the layout.

Each email is sent through the real path (the form, the outbox, `newsletter send`) to a real SMTP server,
then opened in headless Chromium at 375 and 800 px; screenshots go to test-artifacts/screenshots/. The
blog's images are answered by the test at their own https addresses, so the emails SpamAssassin scores
carry the URLs a real blog would give.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import Result

from . import test_browser, test_deliverability
from .conftest import Caught, publish
from .test_browser import SCREENSHOTS
from .test_deliverability import assert_scores_low
from .test_reader_flow import confirm_link

browser, page = test_browser.browser, test_browser.page  # headless Chromium, and a tab that records problems
spamassassin = test_deliverability.spamassassin

BLOG = "https://harbour-notes.example"
LOGO = f"{BLOG}/wp-content/uploads/logo.svg"
FEATURED = f"{BLOG}/wp-content/uploads/2025/04/crane-at-dawn.svg"
WIDE = f"{BLOG}/wp-content/uploads/2025/04/crane-panorama.svg"
GULLS = f"{BLOG}/wp-content/uploads/2025/04/gulls.svg"
ACCENT, ACCENT_RGB = "#0b6e4f", "rgb(11, 110, 79)"
PHONE, DESKTOP = 375, 800
AUTHOR, DATE = "Ada Quay", "April 3, 2025"
LONG_URL = (f"{BLOG}/2025/04/the-new-crane/" + "specifications-" * 20)[:300]


def svg(width: int, height: int, fill: str) -> str:
    """A photo's stand-in: sky over a quay, WIDTH x HEIGHT."""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        f'<rect width="{width}" height="{height}" fill="{fill}"/>'
        f'<rect y="{height * 2 // 3}" width="{width}" height="{height // 3}" fill="#35516e"/></svg>'
    )


LOGO_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="400" height="80" viewBox="0 0 400 80">'
    f'<circle cx="40" cy="40" r="36" fill="{ACCENT}"/><path d="M16 48 q12 -12 24 0 t24 0" stroke="#ffffff" '
    'stroke-width="6" fill="none"/><text x="90" y="54" font-family="Georgia, serif" font-size="40" '
    'fill="#1d2430">Harbour Notes</text></svg>'
)
IMAGES = {
    LOGO: LOGO_SVG,
    FEATURED: svg(1200, 600, "#9cc3e6"),
    WIDE: svg(1600, 500, "#e6c79c"),
    GULLS: svg(800, 400, "#c3e69c"),
}
WIDE_TABLE = (
    "<table><tr>"
    + "".join(f"<th>Berth {n}</th>" for n in range(1, 13))
    + "</tr><tr>"
    + "".join("<td>Donaudampfschifffahrtsgesellschaft</td>" for _ in range(12))
    + "</tr></table>"
)
SUMMARY = (
    "<p>The new crane came in on Monday's tide, in pieces, on three barges.</p>"
    f'<p><img src="{WIDE}" width="1600" height="500" alt="The crane across the whole quay"></p>'
    f'<p>The plans: <a href="{LONG_URL}">{LONG_URL}</a></p>'
    f"<pre>load_table = [{', '.join(str(t * 1000) for t in range(1, 40))}]  # tonnes{'=' * 120}</pre>"
    f"{WIDE_TABLE}"
)
REST = "<p>Only the whole post goes on to tell how the harbour master signed for it.</p><h3>What comes next</h3>"
CONTENT = SUMMARY + REST + "<blockquote><p>“It is longer than the quay is wide,” she said.</p></blockquote>"


def rss_item(title: str, slug: str, summary: str, content: str, image: str, day: int) -> str:
    url = f"{BLOG}/2025/04/{slug}/"
    return (
        f'<item><title>{title}</title><link>{url}</link><guid isPermaLink="false">{url}</guid>'
        f"<dc:creator><![CDATA[{AUTHOR}]]></dc:creator>"
        f"<pubDate>Thu, {day:02d} Apr 2025 10:00:00 +0000</pubDate>"
        f'<media:content url="{image}" medium="image" type="image/svg+xml"/>'
        f"<description><![CDATA[{summary}]]></description>"
        f"<content:encoded><![CDATA[{content}]]></content:encoded></item>\n\t"
    )


def publish_item(feed: Path, item: str) -> None:
    """Put ITEM at the top of FEED, declaring the Media RSS namespace its media:content needs."""
    xml = feed.read_text(encoding="utf-8")
    if "xmlns:media=" not in xml:
        xml = xml.replace("xmlns:content=", 'xmlns:media="http://search.yahoo.com/mrss/"\n\txmlns:content=', 1)
    feed.write_text(xml.replace("<item>", item + "<item>", 1), encoding="utf-8")


@pytest.fixture
def config_file(config_file: Path) -> Path:
    """The test configuration with the blog's branding, and daily digests sent as soon as they are due."""
    branding = f'blog_url = "{BLOG}/"\nlogo_url = "{LOGO}"\naccent_color = "{ACCENT}"\n'
    config_file.write_text(config_file.read_text().replace("[site]\n", "[site]\n" + branding, 1))
    with config_file.open("a") as config:
        config.write("\n[digest]\nsend_hour = 0\n")
    return config_file


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs)))


def elements(html: str, tag: str) -> list[dict[str, str | None]]:
    parser = _Elements()
    parser.feed(html)
    return [attrs for name, attrs in parser.found if name == tag]


def every_email(
    site, smtp, run: Callable[..., Result], feed: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Caught]:
    """One email of each kind, as received: a reader signs up on the form, confirms and asks for a manage
    link; the hostile post goes out as a notification, in a daily digest and as `send --to`'s copy; then,
    with [site] email_content = "full", a second one as the whole post."""
    assert run("posts", "fetch").exit_code == 0
    monkeypatch.setenv("NEWSLETTER_DIGEST__DEFAULT_FREQUENCY", "daily")
    assert run("subscribers", "add", "daily@example.com", "--confirmed").exit_code == 0
    monkeypatch.delenv("NEWSLETTER_DIGEST__DEFAULT_FREQUENCY")

    assert site.subscribe("ada@example.com").status_code == 200
    site.deliver_outbox()
    [confirmation] = smtp.to("ada@example.com")
    assert site.press(confirm_link(confirmation)).status_code == 200
    site.deliver_outbox()
    [welcome] = smtp.to("ada@example.com")[1:]
    assert site.press("/manage", data={"email": "ada@example.com"}).status_code == 200
    site.deliver_outbox()
    [manage] = smtp.to("ada@example.com")[2:]

    publish(feed, "Storm warning for the outer harbour", "storm-warning", "<p>Boats stay in until Friday.</p>")
    publish_item(feed, rss_item("The new crane", "the-new-crane", SUMMARY, CONTENT, FEATURED, 3))
    sent = run("send")
    assert sent.exit_code == 0 and "2 post(s), 1 digest(s): 3 sent, 0 failed" in sent.output, sent.output
    [notification] = [m for m in smtp.to("ada@example.com") if m.message["Subject"] == "The new crane"]
    [digest] = smtp.to("daily@example.com")
    assert run("send", "--to", "owner@harbour-notes.example").exit_code == 0
    [copy] = smtp.to("owner@harbour-notes.example")

    monkeypatch.setenv("NEWSLETTER_SITE__EMAIL_CONTENT", "full")
    publish_item(feed, rss_item("The crane, in full", "the-crane-in-full", SUMMARY, CONTENT, FEATURED, 4))
    sent = run("send")
    assert sent.exit_code == 0 and "1 post(s): 1 sent, 0 failed" in sent.output, sent.output
    [full] = smtp.to("ada@example.com")[5:]
    return {
        "confirmation": confirmation,
        "welcome": welcome,
        "manage": manage,
        "notification": notification,
        "digest": digest,
        "test-copy": copy,
        "notification-full": full,
    }


def serve_the_blog(tab) -> list[str]:
    """Answer the browser's requests for the blog's images; returns the addresses it asked for."""
    asked: list[str] = []

    def answer(route) -> None:
        url = route.request.url
        asked.append(url)
        if url in IMAGES:
            route.fulfill(status=200, content_type="image/svg+xml", body=IMAGES[url])
        else:
            route.fulfill(status=404, content_type="text/plain", body="not found")

    tab.route(f"{BLOG}/**", answer)
    return asked


def open_email(tab, caught: Caught, name: str) -> None:
    """Show the email's HTML part at a phone's and a desktop's width; neither may scroll sideways."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    tab.set_viewport_size({"width": PHONE, "height": 800})
    tab.set_content(caught.html, wait_until="load")
    for width in (PHONE, DESKTOP):
        tab.set_viewport_size({"width": width, "height": 800})
        scroll_width = tab.evaluate("document.documentElement.scrollWidth")
        assert scroll_width <= width, f"the {name} email is {scroll_width}px wide at {width}px"
        tab.screenshot(path=SCREENSHOTS / f"email-{name}-{width}.png", full_page=True)
    tab.set_viewport_size({"width": PHONE, "height": 800})


def loaded(image) -> bool:
    return image.evaluate("i => i.complete && i.naturalWidth > 0")


def assert_branded(tab) -> None:
    """The blog's logo at the top, linked to the blog."""
    logo = tab.get_by_role("link", name="Harbour Notes", exact=True).get_by_role("img", name="Harbour Notes")
    assert logo.count() == 1 and loaded(logo)
    assert logo.evaluate("i => i.closest('a').href") == f"{BLOG}/"
    box = logo.bounding_box()
    assert box is not None and 0 < box["width"] <= 200


def assert_button(tab, label: str, url: str) -> None:
    """LABEL is a link to URL that looks like a button in the accent colour."""
    button = tab.get_by_role("link", name=label, exact=True).first
    assert button.get_attribute("href") == url
    assert button.evaluate("a => getComputedStyle(a).backgroundColor") == ACCENT_RGB
    assert button.evaluate("a => getComputedStyle(a).color") == "rgb(255, 255, 255)"
    assert button.evaluate("a => a.closest('td').getAttribute('bgcolor')") == ACCENT
    box = button.bounding_box()
    assert box is not None and box["height"] >= 40  # padded: a finger's worth


def test_every_email_fits_a_phone_and_looks_like_the_blog(site, smtp, run, feed, page, monkeypatch) -> None:
    emails = every_email(site, smtp, run, feed, monkeypatch)
    asked = serve_the_blog(page)
    post_url = f"{BLOG}/2025/04/the-new-crane/"

    for name, caught in emails.items():
        html = caught.html
        for image in elements(html, "img"):  # the style attribute is what Gmail's app and Outlook keep
            assert re.search(r"max-width: 100%.*height: auto|height: auto.*max-width: 100%", image["style"] or ""), (
                name,
                image,
            )
        for table in elements(html, "table"):
            assert "max-width: 100%" in (table["style"] or ""), (name, table)
        for pre in elements(html, "pre"):
            assert "white-space: pre-wrap" in (pre["style"] or "") and "break-word" in (pre["style"] or ""), name
        assert "-apple-system, BlinkMacSystemFont, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif" in html, name
        assert "<style>" in html, name  # kept for the mail apps that read it

        open_email(page, caught, name)
        assert_branded(page)

    page.set_content(emails["notification"].html, wait_until="load")
    assert page.get_by_role("heading", level=1).inner_text() == "The new crane"
    assert f"{DATE} · by {AUTHOR}" in page.locator("body").inner_text()
    assert_button(page, "Read the post", post_url)
    featured = page.locator(f'img[src="{FEATURED}"]')
    assert featured.count() == 1 and loaded(featured)
    column = page.get_by_role("heading", level=1).bounding_box()["width"]  # a block: the text column's width
    box = featured.bounding_box()
    assert box is not None and column - 1 <= box["width"] <= column  # as wide as the text, no wider
    assert abs(box["height"] - box["width"] / 2) <= 1  # scaled, not squeezed
    wide = page.get_by_role("img", name="The crane across the whole quay")
    assert loaded(wide) and wide.evaluate("i => i.naturalWidth") == 1600
    assert 0 < wide.bounding_box()["width"] <= column
    plans = page.get_by_role("link", name=LONG_URL)
    assert plans.bounding_box()["width"] <= column  # the long address wraps
    assert plans.evaluate("a => getComputedStyle(a).color") == ACCENT_RGB  # links in the blog's colour
    assert page.locator("table.button").count() == 1
    archive = page.get_by_role("link", name="View in browser")
    assert archive.get_attribute("href").startswith("https://news.example.com/archive/")
    assert page.get_by_role("link", name="Unsubscribe").get_attribute("href") == (
        emails["notification"].message["List-Unsubscribe"].strip("<>")
    )
    assert f"{BLOG}/" in emails["notification"].text  # the link on the logo, in the text part too

    page.set_content(emails["digest"].html, wait_until="load")
    assert page.get_by_role("heading", level=2).all_inner_texts() == [
        "Storm warning for the outer harbour",
        "The new crane",
    ]
    assert f"{DATE} · by {AUTHOR}" in page.locator("body").inner_text()
    assert page.get_by_role("link", name="Read the post").count() == 2
    assert_button(page, "Read the post", f"{BLOG}/2025/04/storm-warning/")

    page.set_content(emails["confirmation"].html, wait_until="load")
    assert_button(page, "Confirm my subscription", confirm_link(emails["confirmation"]))
    page.set_content(emails["welcome"].html, wait_until="load")
    assert page.get_by_role("link", name="Manage your subscription").count() == 1

    assert FEATURED in asked and LOGO in asked and WIDE in asked
    assert page.problems == []


def test_full_content_is_the_whole_post_and_summary_is_not(site, smtp, run, feed, monkeypatch) -> None:
    emails = every_email(site, smtp, run, feed, monkeypatch)
    rest = "Only the whole post goes on to tell how the harbour master signed for it."
    for name in ("notification", "digest", "test-copy"):
        assert "The new crane came in on Monday" in emails[name].text, name
        assert rest not in emails[name].text and rest not in emails[name].html, name
    full = emails["notification-full"]
    assert rest in full.html and "What comes next" in full.html and "longer than the quay is wide" in full.html
    assert rest in full.text and "“It is longer than the quay is wide,” she said." in full.text
    assert f"{DATE.replace('3', '4')} · by {AUTHOR}" in full.text
    assert full.text.index("The crane, in full") < full.text.index(rest) < full.text.index("Read the post:")


def test_the_featured_image_is_not_shown_twice(smtp, run, feed) -> None:
    """A post that opens with its featured image shows it once; the text part shows date, author and body."""
    assert run("posts", "fetch").exit_code == 0
    assert run("subscribers", "add", "ada@example.com", "--confirmed").exit_code == 0
    opening = f'<p><img src="{GULLS}" width="800" height="400" alt="Gulls on the breakwater"></p><p>They are back.</p>'
    publish_item(feed, rss_item("Gulls return", "gulls-return", opening, opening, GULLS, 5))
    assert run("send").exit_code == 0
    [note] = smtp.to("ada@example.com")
    assert [image["src"] for image in elements(note.html, "img")] == [LOGO, GULLS]
    assert "Gulls return\nApril 5, 2025 · by Ada Quay\n\nThey are back.\n" in note.text.replace("\r\n", "\n")


def test_an_owners_template_is_inlined_too(smtp, run, config_file: Path, tmp_path: Path) -> None:
    """[site] templates_dir: the owner's <style> reaches each element's style attribute, and every reader still
    gets their own unsubscribe link."""
    templates = tmp_path / "my-templates" / "email"
    templates.mkdir(parents=True)
    (templates / "notification.html").write_text(
        "<!doctype html><html><head><style>.lede { color: #8a2be2; font-size: 21px; }</style></head><body>"
        '<p class="lede">{{ post.title }}</p>\n<p><a href="{{ unsubscribe_url }}">Leave</a></p>\n</body></html>\n',
        encoding="utf-8",
    )
    content = config_file.read_text()
    config_file.write_text(content.replace("[site]\n", f'[site]\ntemplates_dir = "{templates.parent}"\n', 1))
    for address in ("ann@example.com", "bob@example.com"):
        assert run("subscribers", "add", address, "--confirmed").exit_code == 0
    assert run("posts", "add", "--title", "Ice on the quay", "--url", f"{BLOG}/ice/").exit_code == 0
    assert run("send", "--no-fetch").exit_code == 0
    for note in smtp.messages:
        [lede] = [p for p in elements(note.html, "p") if p.get("class") == "lede"]
        assert lede["style"] == "color: #8a2be2;font-size: 21px;"
        [leave] = elements(note.html, "a")
        assert leave["href"] == note.message["List-Unsubscribe"].strip("<>")


def test_every_kind_of_email_scores_low(site, smtp, run, feed, monkeypatch, spamassassin) -> None:
    """SPAM-1 for the new designs: each kind of email, as received, scores below 1.0 offline."""
    for name, caught in every_email(site, smtp, run, feed, monkeypatch).items():
        assert_scores_low(name, spamassassin(caught.raw))
