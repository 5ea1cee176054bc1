"""The blog's branding on the web pages ([site] logo_url, blog_url, description, accent_color), the image
sources the pages' Content-Security-Policy allows, and what `newsletter check` says about the form's origins
and the accent colour."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import test_browser
from .test_browser import HostSite, heading, shoot
from .test_cli import newsletter

browser, page = test_browser.browser, test_browser.page  # the fixtures of the browser tests: Chromium, a tab
BLOG = "https://harbour-notes.example/"
LOGO = "https://cdn.harbour-notes.example/img/logo.png"
DESCRIPTION = "Tides, boats and weather from a small harbour, about once a week."
FONTS = '-apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, Helvetica, Arial, sans-serif'
BRANDED = {"blog_url": BLOG, "logo_url": LOGO, "description": DESCRIPTION, "accent_color": "#0b6e4f"}
LOGO_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="400" height="200" viewBox="0 0 400 200">'
    '<rect width="400" height="200" fill="#0b6e4f"/><circle cx="100" cy="100" r="60" fill="#fff"/></svg>'
)


@pytest.fixture
def branding() -> dict[str, str]:
    """[site] settings the test sets (a test parametrizes this); "{logo_host}" stands for the origin of the
    logo's site, "{tmp_path}" for the test's folder."""
    return {}


@pytest.fixture
def logo_host() -> Iterator[HostSite]:
    """The blog's own site on another origin, serving its logo."""
    host = HostSite()
    host.files["/logo.svg"] = ("image/svg+xml", LOGO_SVG)
    yield host
    host.close()


@pytest.fixture
def config_file(config_file: Path, branding: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    text = config_file.read_text()
    for key, value in branding.items():
        value = value.replace("{tmp_path}", str(tmp_path))
        if "{logo_host}" in value:
            value = value.replace("{logo_host}", request.getfixturevalue("logo_host").origin)
        text = re.sub(rf"(?m)^{key} = .*\n", "", text)
        text = text.replace("[site]\n", f"[site]\n{key} = {json.dumps(value)}\n", 1)
    config_file.write_text(text)
    return config_file


def policy(response) -> dict[str, str]:
    """The Content-Security-Policy of RESPONSE, directive -> sources."""
    directives = (part.strip().partition(" ") for part in response.headers["Content-Security-Policy"].split(";"))
    return {name: sources for name, _, sources in directives}


# ---- the pages ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("branding", [BRANDED])
def test_every_page_shows_the_logo_and_a_way_back_to_the_blog(site, smtp) -> None:
    token = site.nl.tokens.unsubscribe_token(1)
    pages = {
        "subscribe": site.get("/"),
        "check inbox": site.subscribe("reader@example.com"),
        "manage": site.get("/manage"),
        "bad link": site.get("/confirm/bad"),
        "unsubscribe": site.get(f"/unsubscribe/{token}"),
        "not found": site.get("/missing"),
        "archive": site.get("/archive"),
    }
    for name, response in pages.items():
        assert f'<img class="logo" src="{LOGO}" alt="Harbour Notes">' in response.text, name
        assert '<p class="site">' not in response.text, name  # the logo stands for the name
        assert f'<a href="{BLOG}">Back to Harbour Notes</a>' in response.text, name
    assert f'<p class="description">{DESCRIPTION}</p>' in pages["subscribe"].text
    assert DESCRIPTION not in pages["check inbox"].text


def test_without_branding_pages_show_the_name_and_no_link_to_a_blog_nobody_named(site, smtp) -> None:
    """The test's feed_url is a file, so there is no blog address to link to."""
    for response in (site.get("/"), site.subscribe("reader@example.com"), site.get("/missing")):
        assert '<p class="site">Harbour Notes</p>' in response.text
        assert "<img" not in response.text and "Back to Harbour Notes" not in response.text
        assert 'class="description"' not in response.text


@pytest.mark.parametrize("branding", [{"feed_url": "https://harbour-notes.example/feed/"}])
def test_the_way_back_leads_to_the_site_of_an_http_feed(site) -> None:
    assert f'<a href="{BLOG}">Back to Harbour Notes</a>' in site.get("/").text


@pytest.mark.parametrize("branding", [{"blog_url": BLOG}])
def test_a_form_from_a_site_we_do_not_take_sign_ups_from_links_to_our_form_and_the_blog(site) -> None:
    refused = site.post("/subscribe", data=site.form("victim@example.com"), headers={"Origin": "https://evil.example"})
    assert refused.status_code == 403 and "Sign up on the newsletter&#39;s own page" in refused.text
    assert '<a href="/">Sign up on the newsletter&#39;s subscribe page</a>' in refused.text
    assert f'<a href="{BLOG}">Back to Harbour Notes</a>' in refused.text
    form = site.get("/")
    assert form.status_code == 200 and 'name="email"' in form.text  # where that link leads: our own form


# ---- Content-Security-Policy --------------------------------------------------------------------------------


@pytest.mark.parametrize("branding", [{"logo_url": LOGO}])
def test_the_logos_site_is_the_one_other_image_source(site) -> None:
    for response in (site.get("/"), site.get("/missing"), site.get("/style.css")):
        csp = policy(response)
        assert csp["img-src"] == "'self' https://cdn.harbour-notes.example"
        assert csp["script-src"] == "'none'" and csp["style-src"] == "'self'" and csp["default-src"] == "'self'"
        assert "unsafe-inline" not in response.headers["Content-Security-Policy"]


def test_without_a_logo_images_come_only_from_this_site(site) -> None:
    csp = policy(site.get("/"))
    assert csp["img-src"] == "'self'" and csp["script-src"] == "'none'" and csp["frame-ancestors"] == "'none'"


# ---- the stylesheet -----------------------------------------------------------------------------------------


def test_the_stylesheet_keeps_todays_colours_without_an_accent(site) -> None:
    css = site.get("/style.css")
    assert css.status_code == 200 and css.headers["Content-Type"].startswith("text/css")
    assert "--accent: #1f5fbf;" in css.text and "--link: #1f5fbf;" in css.text and "background: #1a51a2;" in css.text
    assert "--accent-text: #ffffff;" in css.text
    assert f"font: 17px/1.55 {FONTS};" in css.text
    assert "{{" not in css.text and "{#" not in css.text


def test_pages_and_emails_share_one_font_stack() -> None:
    email = (Path(__file__).parents[1] / "templates" / "email" / "base.html").read_text()
    assert f"font-family: {FONTS};" in email


@pytest.mark.parametrize("branding", [{"accent_color": "#0b6e4f"}])
def test_buttons_and_links_take_the_accent(site) -> None:
    css = site.get("/style.css").text
    assert "--accent: #0b6e4f;" in css and "--accent-text: #ffffff;" in css and "--link: #0b6e4f;" in css
    assert "#1f5fbf" not in css and "background: #095e43;" in css  # hover: the accent darkened
    assert site.get("/style.css").text == css  # the same for every request


@pytest.mark.parametrize("branding", [{"accent_color": "#ffee00"}])
def test_a_pale_accent_keeps_links_in_the_text_colour(site) -> None:
    css = site.get("/style.css").text
    assert "--accent: #ffee00;" in css and "--accent-text: #000000;" in css  # black on a yellow button
    assert "--link: #1d2430;" in css and "--ink: #1d2430;" in css  # links as readable as the text


@pytest.mark.parametrize("branding", [{"templates_dir": "{tmp_path}/mine", "accent_color": "teal"}])
def test_the_owners_stylesheet_replaces_ours(site, tmp_path: Path) -> None:
    own = tmp_path / "mine" / "web"
    own.mkdir(parents=True)
    (own / "style.css").write_text("body { background: {{ site.accent_color }}; font-family: Georgia, serif; }\n")
    css = site.get("/style.css")
    assert css.status_code == 200 and css.text.strip() == "body { background: #008080; font-family: Georgia, serif; }"


# ---- in a browser -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "branding", [{**BRANDED, "logo_url": "{logo_host}/logo.svg", "accent_color": "rgb(11 110 79)"}]
)
def test_a_reader_sees_the_blogs_logo_from_its_own_site_in_a_browser(site, page) -> None:
    assert page.goto(site.base + "/").status == 200
    logo = page.get_by_role("img", name="Harbour Notes")
    logo.wait_for()
    loaded = logo.evaluate("img => img.complete && img.naturalWidth")
    assert loaded == 400  # the browser fetched it: the page's CSP allows the logo's site
    box = logo.bounding_box()
    assert box is not None and box["height"] <= 48 and box["width"] == pytest.approx(2 * box["height"], abs=1)
    assert page.get_by_text(DESCRIPTION).is_visible()
    back = page.get_by_role("link", name="Back to Harbour Notes")
    assert back.get_attribute("href") == BLOG
    button = page.get_by_role("button", name="Subscribe")
    assert button.evaluate("b => getComputedStyle(b).backgroundColor") == "rgb(11, 110, 79)"
    assert back.evaluate("a => getComputedStyle(a).color") == "rgb(11, 110, 79)"
    assert page.problems == []  # no CSP violation, no image refused
    shoot(page, "09-branded-subscribe")


@pytest.mark.parametrize("branding", [{"accent_color": "#ffee00"}])
def test_a_pale_accent_paints_buttons_and_leaves_links_readable_in_a_browser(site, page) -> None:
    assert page.goto(site.base + "/").status == 200 and heading(page) == "Get new posts by email"
    button = page.get_by_role("button", name="Subscribe")
    assert button.evaluate("b => getComputedStyle(b).backgroundColor") == "rgb(255, 238, 0)"
    assert button.evaluate("b => getComputedStyle(b).color") == "rgb(0, 0, 0)"
    link = page.get_by_role("link", name="Manage your subscription")
    assert link.evaluate("a => getComputedStyle(a).color") == "rgb(29, 36, 48)"
    assert page.problems == []


# ---- newsletter check ---------------------------------------------------------------------------------------


def check_lines(config_file: Path) -> dict[str, str]:
    """`newsletter check` in its own process: each check's name -> its label and lines, as printed."""
    result = newsletter(config_file, "check")
    assert result.returncode == 0, (result.stdout, result.stderr)  # warnings do not fail the check
    checks: dict[str, str] = {}
    name = ""
    for line in result.stdout.splitlines():
        if not line.startswith(" "):
            label, _, rest = line.partition(" ")
            name, _, detail = rest.strip().partition(": ")
            checks[name] = f"{label} {detail}"
        else:
            checks[name] += "\n" + line.strip()
    return checks


def test_check_warns_when_the_blogs_site_is_not_known(config_file: Path, smtp) -> None:
    checks = check_lines(config_file)
    origins = checks["form origins"]
    assert origins.startswith("warn accepted from https://news.example.com;")
    assert "form embedded on the blog is refused" in origins
    assert origins.splitlines()[-1].startswith("set [site] blog_url to the blog's address")
    assert checks["accent_color"].startswith("ok #1f5fbf")


@pytest.mark.parametrize("branding", [{"feed_url": "https://feeds.feedburner.com/harbour-notes"}])
def test_check_warns_when_the_blogs_site_is_guessed_from_a_feed_service(config_file: Path, smtp) -> None:
    origins = check_lines(config_file)["form origins"]
    assert origins.startswith("warn accepted from https://news.example.com, https://feeds.feedburner.com;")
    assert "guessed from [site] feed_url" in origins and "feeds.feedburner.com looks like a feed service" in origins
    assert origins.splitlines()[-1].startswith("set [site] blog_url to the blog's address")


@pytest.mark.parametrize("branding", [{"blog_url": BLOG, "accent_color": "#ffee00"}])
def test_check_warns_about_a_pale_accent(config_file: Path, smtp) -> None:
    checks = check_lines(config_file)
    accent = checks["accent_color"]
    assert accent.startswith("warn #ffee00 has a contrast of 1.2:1 against white (under 3:1)")
    assert "links in it would be hard to read" in accent
    assert checks["form origins"].startswith("ok ")


@pytest.mark.parametrize(
    "branding",
    [
        {"blog_url": BLOG, "accent_color": "#0b6e4f"},
        {"feed_url": "https://harbour-notes.example/feed/", "accent_color": "#0b6e4f"},
    ],
)
def test_check_has_no_warning_for_a_known_blog_and_a_dark_accent(config_file: Path, smtp) -> None:
    checks = check_lines(config_file)
    assert not [line for line in checks.values() if line.startswith("warn")], checks
    assert checks["form origins"].startswith(
        "ok accepted from https://news.example.com, https://harbour-notes.example (the blog: "
    )
    assert checks["accent_color"].startswith("ok #0b6e4f for buttons and links, a contrast of 6.")
