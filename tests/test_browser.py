"""A reader in a real browser: headless Chromium against the app over HTTP, mail through a real SMTP server.

Needs Chromium on the PATH (Debian: `apt-get install chromium`) and the `playwright` Python package; Playwright's
own browser download is not used. Without them the tests are skipped, unless the CI environment variable is set.
Screenshots of every page, at a phone and a desktop width, go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import select

from newsletter.i18n import Language
from newsletter.models import Status, Subscriber

from .conftest import publish
from .test_reader_flow import confirm_link, subscriber, unsubscribe_link

SCREENSHOTS = Path(__file__).parents[1] / "test-artifacts" / "screenshots"
WIDTHS = (375, 1280)
HUMAN_PACE = 2.5  # seconds between loading the subscribe page and submitting it; [web] min_fill_seconds is 2
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
PHONE = WIDTHS[0]
WIDE_PHOTO = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="1200" height="600" viewBox="0 0 1200 600">'
    '<rect width="1200" height="600" fill="#9cc3e6"/><rect y="420" width="1200" height="180" fill="#35516e"/>'
    '<rect x="180" y="150" width="40" height="270" fill="#d9822b"/><rect x="180" y="150" width="520" height="30" '
    'fill="#d9822b"/></svg>'
)
ACCENT = "rgb(31, 95, 191)"  # style.css --accent: proves the stylesheet loaded under the page's CSP


class HostSite:
    """Someone's web site on another loopback port (another origin) that serves one page and any files the
    test sets."""

    def __init__(self) -> None:
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                kind, text = site.files.get(self.path, ("text/html; charset=utf-8", site.html))
                body = text.encode()
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.html = ""
        self.files: dict[str, tuple[str, str]] = {}  # other paths: content type and text
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def blog() -> Iterator[HostSite]:
    """The blog's own site, where the owner pastes `newsletter embed`; listed in [web] embed_origins."""
    host = HostSite()
    yield host
    host.close()


@pytest.fixture
def copycat() -> Iterator[HostSite]:
    """A site the owner never listed, with a copy of the form."""
    host = HostSite()
    yield host
    host.close()


@pytest.fixture
def extra_config(blog: HostSite) -> str:
    return f'[web]\nembed_origins = ["{blog.origin}"]\n'


def missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so the browser test must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright Python package is not installed (pip install playwright)")
    executable = shutil.which("chromium")
    if executable is None:
        missing("no chromium on the PATH (Debian: apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


class Problems(list):
    """Console errors (a CSP violation, say), page errors, failed requests and refused stylesheets or images."""


@pytest.fixture
def page(browser) -> Iterator:
    context = browser.new_context(viewport={"width": WIDTHS[-1], "height": 800}, locale="en-GB")
    context.set_default_timeout(10_000)
    tab = context.new_page()
    tab.problems = Problems()
    tab.on(
        "console",
        lambda m: (
            m.type == "error"
            and not m.text.startswith("Failed to load resource")
            and tab.problems.append(f"console: {m.text}")
        ),
    )
    tab.on("pageerror", lambda e: tab.problems.append(f"page error: {e}"))
    tab.on("requestfailed", lambda r: tab.problems.append(f"request failed: {r.url} {r.failure}"))
    tab.on(
        "response",
        lambda r: (
            r.status >= 400
            and r.request.resource_type != "document"
            and not r.url.endswith("/favicon.ico")
            and tab.problems.append(f"{r.status}: {r.url}")
        ),
    )
    yield tab
    context.close()


def shoot(page, name: str) -> None:
    """Full-page PNGs at each width; on each, nothing may stick out sideways (no horizontal scrolling)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 800})
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"{name} at {width}px scrolls sideways by {overflow}px"
        page.screenshot(path=SCREENSHOTS / f"{name}-{width}.png", full_page=True)


def heading(page) -> str:
    return page.get_by_role("heading", level=1).inner_text()


def honeypot_is_out_of_sight(page) -> None:
    """The `website` trap is off-screen for sighted people and absent for screen readers: one textbox only."""
    trap = page.locator('input[name="website"]')
    box = trap.bounding_box()
    assert box is not None and box["x"] + box["width"] <= 0, box
    assert page.get_by_role("textbox").count() == 1


def submit(page, button: str, url: str):
    """Click BUTTON and wait for the page its form loads; returns that response."""
    with page.expect_navigation(url=url) as navigation:
        page.get_by_role("button", name=button).click()
    return navigation.value


def type_like_a_person(page, field, text: str, since: float) -> None:
    field.click()
    field.press_sequentially(text, delay=40)
    time.sleep(max(0.0, since + HUMAN_PACE - time.monotonic()))


def test_reader_subscribes_confirms_and_unsubscribes_in_a_browser(site, smtp, run, feed, page) -> None:
    assert run("posts", "fetch").exit_code == 0

    loaded = page.goto(site.base + "/")
    opened = time.monotonic()
    assert loaded.status == 200
    assert page.title() == "Subscribe to Harbour Notes" and heading(page) == "Get new posts by email"
    email = page.get_by_label("Email address", exact=True)
    assert email.get_attribute("type") == "email" and email.get_attribute("autocomplete") == "email"
    assert page.get_by_role("button", name="Subscribe").evaluate("b => getComputedStyle(b).backgroundColor") == ACCENT
    honeypot_is_out_of_sight(page)
    shoot(page, "01-subscribe")

    # A slip of the finger: the page comes back with the form, the address kept and the reason beside it.
    type_like_a_person(page, email, "ada.example.com", since=opened)
    with page.expect_request(f"{site.base}/subscribe") as posted:
        rejected = submit(page, "Subscribe", f"{site.base}/subscribe")
    opened = time.monotonic()
    assert rejected.status == 400, (
        f"{rejected.status} for a form sent with Origin: "
        f"{posted.value.header_value('origin')}: {page.locator('main').inner_text()!r}"
    )
    error = page.get_by_role("alert")
    assert error.inner_text() == "An email address must have an @-sign."
    email = page.get_by_label("Email address", exact=True)
    assert email.input_value() == "ada.example.com"
    assert email.get_attribute("aria-invalid") == "true" and email.get_attribute("aria-describedby") == "email-error"
    field_box, error_box = email.bounding_box(), error.bounding_box()
    assert 0 <= error_box["y"] - (field_box["y"] + field_box["height"]) < 24  # right under the field
    assert subscriber(site.nl, "ada@example.com") is None
    honeypot_is_out_of_sight(page)
    shoot(page, "02-subscribe-error")

    email.fill("")
    type_like_a_person(page, email, "ada@example.com", since=opened)
    accepted = submit(page, "Subscribe", f"{site.base}/subscribe")
    assert accepted.status == 200 and heading(page) == "Check your inbox"
    site.record_signups()
    assert subscriber(site.nl, "ada@example.com").status == Status.UNCONFIRMED
    shoot(page, "03-check-inbox")

    assert smtp.messages == []
    site.deliver_outbox()
    [confirmation] = smtp.to("ada@example.com")
    link = confirm_link(confirmation)
    assert page.goto(site.url(link)).status == 200
    assert heading(page) == "Confirm your subscription"
    [cookie] = page.context.cookies(site.base)  # base_url is https: Secure, which Chromium keeps for 127.0.0.1
    assert cookie["secure"] and cookie["httpOnly"]
    assert subscriber(site.nl, "ada@example.com").status == Status.UNCONFIRMED  # opening the link is not enough
    shoot(page, "04-confirm")

    confirmed = submit(page, "Yes, subscribe me", site.url(link))
    assert confirmed.status == 200 and heading(page) == "You're subscribed"
    assert subscriber(site.nl, "ada@example.com").status == Status.CONFIRMED
    shoot(page, "05-confirmed")

    site.deliver_outbox()  # the welcome email
    publish(feed, "Ice on the quay", "ice-on-the-quay")
    smtp.clear()
    sent = run("send")
    assert sent.exit_code == 0 and "1 sent, 0 failed" in sent.output, sent.output
    [notification] = smtp.to("ada@example.com")
    assert notification.message["Subject"] == "Ice on the quay"
    leave = unsubscribe_link(notification)
    assert page.goto(site.url(leave)).status == 200
    assert heading(page) == "Unsubscribe from Harbour Notes?"
    assert subscriber(site.nl, "ada@example.com").status == Status.CONFIRMED
    shoot(page, "06-unsubscribe")

    left = submit(page, "Unsubscribe", site.url(leave))
    assert left.status == 200 and heading(page) == "You're unsubscribed"
    gone = subscriber(site.nl, "ada@example.com")
    assert gone.status == Status.UNSUBSCRIBED and gone.unsubscribed_at is not None
    shoot(page, "07-unsubscribed")

    assert page.problems == []


def blog_page(snippet: str) -> str:
    """A post on the blog with the owner's snippet in the sidebar."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Harbour Notes</title>
<style>body {{ font: 16px/1.5 Georgia, serif; margin: 0 auto; padding: 1rem; max-width: 46rem; }}</style>
</head><body>
<header><h1>Harbour Notes</h1></header>
<article><h2>Market prices: a quiet week</h2><p>Boats in, nets mended, prices steady along the quay.</p></article>
<aside>
{snippet}
</aside>
</body></html>"""


def answer_in_place(page) -> str:
    """Press Subscribe on the embedded form and wait for what it says beside the form."""
    page.get_by_role("button", name="Subscribe").click()
    page.wait_for_function("() => document.querySelector('[role=status]').textContent.trim() !== ''")
    return page.get_by_role("status").inner_text()


def test_form_embedded_on_the_blog_answers_in_place_in_a_browser(site, smtp, run, page, blog) -> None:
    snippet = run("embed").stdout
    assert f'action="{site.nl.config.base_url}/subscribe"' in snippet and "<script>" in snippet
    blog.html = blog_page(site.url(snippet))

    assert page.goto(f"{blog.origin}/").status == 200
    email = page.get_by_label("Get new posts by email", exact=True)
    assert email.get_attribute("type") == "email"
    honeypot_is_out_of_sight(page)
    shoot(page, "08-embed-host")

    # An address the browser lets through but we cannot mail: the reason appears under the form.
    email.fill("fan@example")
    said = answer_in_place(page)
    assert "It should have a period." in said and "Check your inbox" not in said, said
    assert page.url == f"{blog.origin}/" and page.get_by_role("button", name="Subscribe").is_enabled()
    assert page.problems == [f"400: {site.base}/subscribe"]  # the answer the script read, not a fault
    page.problems.clear()
    shoot(page, "08-embed-error")

    page.get_by_role("button", name="Subscribe").evaluate(
        "b => { window.pressed = []; new MutationObserver(() => pressed.push(b.disabled)).observe(b, {attributes: 1}) }"
    )
    assert page.context.cookies(site.base) == []
    email.fill("fan@example.com")
    with page.expect_request(f"{site.base}/subscribe") as sent:
        said = answer_in_place(page)
    headers = sent.value.all_headers()
    assert sent.value.method == "POST" and headers.get("origin") == blog.origin and "cookie" not in headers
    assert headers.get("accept") == "application/json"
    assert said.startswith("Check your inbox"), said
    assert page.url == f"{blog.origin}/" and heading(page) == "Harbour Notes"  # still on the blog
    assert page.evaluate("pressed")[0] is True  # the button was disabled while the form was on its way
    assert not page.get_by_role("button", name="Subscribe").is_visible() and not email.is_visible()
    assert page.context.cookies(site.base) == []
    shoot(page, "08-embed-check-inbox")

    site.record_signups()
    assert subscriber(site.nl, "fan@example.com").status == Status.UNCONFIRMED
    site.deliver_outbox()
    assert smtp.subjects("fan@example.com") == ["Confirm your subscription to Harbour Notes"]
    assert page.problems == []


def test_form_embedded_on_the_blog_posts_cross_origin_in_a_browser(site, smtp, run, browser, blog, copycat) -> None:
    """With JavaScript off the snippet is a plain form: the reader lands on our "Check your inbox" page."""
    snippet = run("embed").stdout
    blog.html = copycat.html = blog_page(site.url(snippet))
    context = browser.new_context(
        viewport={"width": WIDTHS[-1], "height": 800}, locale="en-GB", java_script_enabled=False
    )
    context.set_default_timeout(10_000)
    page = context.new_page()

    assert page.goto(f"{blog.origin}/").status == 200
    assert page.context.cookies(site.base) == []
    page.get_by_label("Get new posts by email", exact=True).fill("fan@example.com")
    with page.expect_request(f"{site.base}/subscribe") as sent:
        accepted = submit(page, "Subscribe", f"{site.base}/subscribe")
    headers = sent.value.all_headers()
    assert sent.value.method == "POST" and headers.get("origin") == blog.origin and "cookie" not in headers
    assert accepted.status == 200 and heading(page) == "Check your inbox"
    shoot(page, "08-embed-no-script-check-inbox")
    site.record_signups()
    assert subscriber(site.nl, "fan@example.com").status == Status.UNCONFIRMED
    site.deliver_outbox()
    assert smtp.subjects("fan@example.com") == ["Confirm your subscription to Harbour Notes"]

    # The same snippet copied onto a site the owner did not list is refused, and stores nothing.
    page.goto(f"{copycat.origin}/")
    page.get_by_label("Get new posts by email", exact=True).fill("victim@example.com")
    refused = submit(page, "Subscribe", f"{site.base}/subscribe")
    assert refused.status == 403 and heading(page) == "Sign up on the newsletter's own page"
    site.record_signups()
    with site.nl.sessions() as session:
        assert session.scalars(select(Subscriber.email)).all() == ["fan@example.com"]
    context.close()


def test_a_copy_of_the_form_on_another_site_says_where_to_sign_up_in_a_browser(site, run, page, copycat) -> None:
    copycat.html = blog_page(site.url(run("embed").stdout))
    assert page.goto(f"{copycat.origin}/").status == 200
    page.get_by_label("Get new posts by email", exact=True).fill("victim@example.com")
    said = answer_in_place(page)
    assert said == "Could not subscribe here. Please sign up on the newsletter's own page.", said
    link = page.get_by_role("link", name="Could not subscribe here. Please sign up on the newsletter's own page.")
    assert link.get_attribute("href") == f"{site.base}/"
    assert page.url == f"{copycat.origin}/" and page.get_by_role("button", name="Subscribe").is_enabled()
    shoot(page, "08-embed-copycat")
    site.record_signups()
    with site.nl.sessions() as session:
        assert session.scalars(select(Subscriber.email)).all() == []
    [console] = [problem for problem in page.problems if problem.startswith("console:")]
    assert "blocked by CORS policy" in console  # the browser withheld our answer from the copy's script
    assert sorted(page.problems) == sorted([console, f"request failed: {site.base}/subscribe net::ERR_FAILED"])


def test_a_wide_feed_image_fits_the_notification_on_a_phone(site, smtp, run, feed, page, blog) -> None:
    blog.files["/crane.svg"] = ("image/svg+xml", WIDE_PHOTO)
    assert run("posts", "fetch").exit_code == 0
    assert run("subscribers", "add", "ada@example.com", "--confirmed").exit_code == 0
    summary = (
        "<p>The new crane came in on Monday's tide.</p>"
        f'<p><img src="{blog.origin}/crane.svg" width="1200" height="600" alt="The crane on the quay"></p>'
        "<p>It is longer than the quay is wide.</p>"
    )
    publish(feed, "The new crane", "the-new-crane", summary=summary)
    sent = run("send")
    assert sent.exit_code == 0 and "1 sent, 0 failed" in sent.output, sent.output
    [notification] = [m for m in smtp.to("ada@example.com") if m.message["Subject"] == "The new crane"]
    [img] = re.findall(r"<img [^>]*>", notification.html)
    assert f'src="{blog.origin}/crane.svg"' in img and 'width="1200"' in img  # the feed's size reaches the email

    page.set_viewport_size({"width": PHONE, "height": 800})
    page.set_content(notification.html, wait_until="load")
    image = page.get_by_role("img", name="The crane on the quay")
    assert image.evaluate("i => i.naturalWidth") == 1200  # the image loaded, at its full size
    column = image.evaluate("i => i.parentElement.getBoundingClientRect().width")
    box = image.bounding_box()
    assert box is not None and 0 < box["width"] <= column < PHONE
    assert abs(box["height"] - box["width"] / 2) <= 1  # scaled down, not squeezed
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE
    shoot(page, "09-notification-wide-image")

    assert page.problems == []


def test_from_a_notification_to_the_manage_page_and_weekly_in_a_browser(site, smtp, run, feed, page) -> None:
    """notification -> Manage your subscription -> weekly, one category -> Save: the page says what changed."""
    assert run("posts", "fetch").exit_code == 0
    assert run("subscribers", "add", "ada@example.com", "--confirmed").exit_code == 0
    publish(feed, "Ice on the quay", "ice-on-the-quay")
    assert run("send").exit_code == 0
    [notification] = smtp.to("ada@example.com")
    link = next(url for url in notification.links() if "/manage/" in url)
    assert "Manage your subscription</a>" in notification.html

    assert page.goto(site.url(link)).status == 200
    assert heading(page) == "Your subscription"
    assert page.get_by_label("An email for each new post").is_checked()
    assert subscriber(site.nl, "ada@example.com").frequency == "instant"  # opening the page changes nothing
    shoot(page, "10-manage")

    page.get_by_label("A weekly digest").check()
    page.get_by_label("Markets").check()
    saved = submit(page, "Save", site.url(link))
    assert saved.status == 200 and heading(page) == "Your subscription"
    status = page.get_by_role("status").inner_text()
    assert "You now get a weekly digest." in status and "You now get posts about Markets." in status
    assert page.get_by_label("A weekly digest").is_checked() and page.get_by_label("Markets").is_checked()
    assert subscriber(site.nl, "ada@example.com").frequency == "weekly"
    shoot(page, "11-manage-saved")

    assert page.problems == []


@pytest.fixture
def language() -> str:
    return "en"


@pytest.fixture
def config_file(config_file: Path, language: str) -> Path:
    config_file.write_text(config_file.read_text().replace("[site]\n", f'[site]\nlanguage = "{language}"\n', 1))
    return config_file


@pytest.mark.parametrize("language", ["de", "fr", "es", "ja"])
def test_each_language_fits_a_phone(site, smtp, run, feed, page, language: str) -> None:
    """The subscribe page and a notification in each shipped language: longer German words and Japanese
    lines without spaces still fit 375 px, and the page says which language it is in."""
    said = Language(language)
    assert page.goto(site.base).status == 200
    assert page.locator("html").get_attribute("lang") == language
    assert heading(page) == said.gettext("Get new posts by email") != "Get new posts by email"
    shoot(page, f"20-{language}-subscribe")

    assert run("posts", "fetch").exit_code == 0
    assert run("subscribers", "add", "ada@example.com", "--confirmed").exit_code == 0
    publish(feed, "Ice on the quay", "ice-on-the-quay")
    assert run("send").exit_code == 0
    [notification] = smtp.to("ada@example.com")
    page.goto("about:blank")  # an email is not under the site's CSP
    page.set_content(notification.html, wait_until="load")
    assert page.get_by_role("link", name=said.gettext("Read the post")).count() == 1
    shoot(page, f"21-{language}-notification")
    assert page.problems == []
