"""The form embedded in the blog, over real HTTP: its script asks for JSON, which CORS lets only the blog's
pages read; the `embed` command that prints it."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from newsletter.models import Signup, Status

from .test_http_edges import assert_security_headers
from .test_reader_flow import subscriber

BLOG = "https://harbour-notes.example"
SCRIPT = {"Accept": "application/json", "Origin": BLOG, "Sec-Fetch-Site": "cross-site"}  # what the snippet sends
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
CHECK_INBOX = (
    "Check your inbox: if that address can receive our emails, a message with a confirmation link is on its way. "
    "Open it and confirm to start getting new posts."
)


@pytest.fixture
def extra_config() -> str:
    return f'[web]\nembed_origins = ["{BLOG}"]\nrate_limit = "3 per hour"\n'


def signups(nl) -> int:
    with nl.sessions() as session:
        return session.scalar(select(func.count()).select_from(Signup))


def test_the_blogs_script_reads_check_your_inbox_and_the_same_for_a_known_address(site, smtp) -> None:
    first = site.post("/subscribe", data={"email": "fan@example.com", "website": ""}, headers=SCRIPT)
    assert first.status_code == 200 and first.json() == {"ok": True, "message": CHECK_INBOX}
    assert first.headers["Access-Control-Allow-Origin"] == BLOG and "Origin" in first.headers["Vary"]
    assert "Access-Control-Allow-Credentials" not in first.headers and "Set-Cookie" not in first.headers
    assert first.headers["Content-Type"] == "application/json" and first.headers["Cache-Control"] == "no-store"
    assert_security_headers(first.headers, hsts=True)
    site.record_signups()
    assert subscriber(site.nl, "fan@example.com").status == Status.UNCONFIRMED

    again = site.post("/subscribe", data={"email": "Fan@Example.com", "website": ""}, headers=SCRIPT)
    assert (again.status_code, again.json()) == (200, first.json())  # never tells who is subscribed

    page = site.post(
        "/subscribe", data={"email": "page@example.com", "website": ""}, headers={**SCRIPT, "Accept": BROWSER_ACCEPT}
    )
    assert page.status_code == 200 and "<h1>Check your inbox</h1>" in page.text  # without the script: our page
    assert page.headers["Access-Control-Allow-Origin"] == BLOG


def test_a_foreign_site_gets_403_no_cors_header_and_nothing_is_stored(site, smtp) -> None:
    refused = site.post(
        "/subscribe",
        data={"email": "victim@example.com", "website": ""},
        headers={**SCRIPT, "Origin": "https://copycat.example"},
    )
    assert refused.status_code == 403 and refused.json()["ok"] is False
    assert "does not take sign-ups from" in refused.json()["message"]
    assert "Access-Control-Allow-Origin" not in refused.headers and "Origin" in refused.headers["Vary"]
    assert_security_headers(refused.headers, hsts=True)
    lookalike = site.post(
        "/subscribe", data={"email": "victim@example.com"}, headers={**SCRIPT, "Origin": BLOG + ".copycat.example"}
    )
    assert lookalike.status_code == 403 and "Access-Control-Allow-Origin" not in lookalike.headers
    assert signups(site.nl) == 0


def test_a_preflight_is_answered_for_the_blog_only(site) -> None:
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    blog = site.request("OPTIONS", "/subscribe", headers={"Origin": BLOG, **ask})
    assert blog.status_code == 200 and blog.headers["Access-Control-Allow-Origin"] == BLOG
    assert blog.headers["Access-Control-Allow-Methods"] == "POST"
    assert "content-type" in blog.headers["Access-Control-Allow-Headers"].lower()
    assert "Origin" in blog.headers["Vary"] and "Access-Control-Allow-Credentials" not in blog.headers
    foreign = site.request("OPTIONS", "/subscribe", headers={"Origin": "https://copycat.example", **ask})
    assert foreign.status_code == 200 and not any(name.startswith("Access-Control-") for name in foreign.headers)
    other_route = site.request("OPTIONS", "/", headers={"Origin": BLOG, **ask})
    assert "Access-Control-Allow-Origin" not in other_route.headers


def test_what_to_fix_comes_back_as_json_with_the_status(site, smtp) -> None:
    bad = site.post("/subscribe", data={"email": "fan@example", "website": ""}, headers=SCRIPT)
    assert bad.status_code == 400 and bad.json()["ok"] is False and "period" in bad.json()["message"]
    assert bad.headers["Access-Control-Allow-Origin"] == BLOG
    empty = site.post("/subscribe", data={"website": ""}, headers=SCRIPT)
    assert empty.status_code == 400 and empty.json() == {"ok": False, "message": "Please enter your email address."}
    huge = site.post("/subscribe", data={"email": "x" * 70_000}, headers=SCRIPT)
    assert huge.status_code == 413 and huge.json() == {
        "ok": False,
        "message": "That form sent far more data than a sign-up needs.",
    }
    assert signups(site.nl) == 0

    for i in range(3):
        assert site.post("/subscribe", data={"email": f"reader{i}@example.com"}, headers=SCRIPT).status_code == 200
    over = site.post("/subscribe", data={"email": "one-more@example.com"}, headers=SCRIPT)
    assert over.status_code == 429 and int(over.headers["Retry-After"]) > 0
    assert over.json()["ok"] is False and "try again later" in over.json()["message"]
    assert over.headers["Access-Control-Allow-Origin"] == BLOG
    assert signups(site.nl) == 3


def test_the_json_path_passes_the_same_bot_checks(site, smtp) -> None:
    trapped = site.post(
        "/subscribe", data={"email": "bot@example.com", "website": "http://spam.example"}, headers=SCRIPT
    )
    assert trapped.status_code == 400 and trapped.json()["ok"] is False
    assert "please press Subscribe again" in trapped.json()["message"]
    quick = site.post("/subscribe", data=site.form("quick@example.com", opened_ago=0), headers=SCRIPT)
    assert quick.status_code == 400 and "quicker than a person" in quick.json()["message"]
    assert signups(site.nl) == 0
    site.deliver_outbox()
    assert smtp.messages == []


def test_embed_prints_the_snippet_with_its_script_or_without(run) -> None:
    snippet = run("embed")
    assert snippet.exit_code == 0 and snippet.stderr == ""
    assert 'action="https://news.example.com/subscribe"' in snippet.stdout and "<script>" in snippet.stdout
    assert 'link.href = "https://news.example.com/";' in snippet.stdout
    plain = run("embed", "--no-script")
    assert plain.exit_code == 0 and 'name="email"' in plain.stdout and "<script" not in plain.stdout
    explained = run("embed", "--help").stdout
    assert "--no-script" in explained and "[site] blog_url" in explained and "[web] embed_origins" in explained


@pytest.mark.parametrize("extra_config", [""], ids=["no blog site"])
def test_embed_warns_when_no_blog_site_is_set(run) -> None:
    snippet = run("embed")
    assert snippet.exit_code == 0 and "<form" in snippet.stdout
    assert snippet.stderr.count("\n") == 1
    assert "[site] blog_url" in snippet.stderr and "[web] embed_origins" in snippet.stderr
