"""[site] language: every page and email a reader sees, in German, French, Spanish and Japanese as in English."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from babel.messages.catalog import Catalog
from babel.messages.pofile import read_po

from newsletter.config import ConfigError, load_config
from newsletter.i18n import CATALOGS, Language

from .conftest import publish
from .test_reader_flow import confirm_link

ROOT = Path(__file__).resolve().parent.parent
LANGUAGES = ["de", "fr", "es", "ja"]
NOT_FOR_READERS = {"web/demo.html", "web/style.css"}  # the owner's demo mailbox; CSS


def catalog(language: str) -> Catalog:
    with (CATALOGS / language / "LC_MESSAGES" / "messages.po").open("rb") as file:
        return read_po(file, locale=language)


def template() -> Catalog:
    with (CATALOGS / "messages.pot").open("rb") as file:
        return read_po(file)


def outside_gettext(source: str, name: str) -> list[str]:
    """The words a reader would see in template SOURCE that no translation call covers."""
    source = re.sub(r"{%-?\s*trans\b.*?{%-?\s*endtrans\s*-?%}", " ", source, flags=re.S)
    source = re.sub(r"{#.*?#}|{%.*?%}|{{.*?}}", " ", source, flags=re.S)
    if name.endswith((".html", ".xml")):
        source = re.sub(r"<!--.*?-->|<(script|style)\b.*?</\1>", " ", source, flags=re.S)
        shown = re.findall(r'\b(?:alt|placeholder|title|aria-label)="([^"]*)"', source)
        source = " ".join([re.sub(r"<[^>]*>", " ", source), *shown])
    text = re.sub(r"\S*/\S*", " ", html.unescape(source))  # paths and URLs
    return re.findall(r"[^\W\d_]{2,}", text)


def test_every_string_readers_see_goes_through_gettext() -> None:
    """A template with visible text outside {% trans %} or _() fails here, naming the words."""
    untranslated = {
        str(path.relative_to(ROOT / "templates")): words
        for path in sorted((ROOT / "templates").rglob("*"))
        if path.is_file() and str(path.relative_to(ROOT / "templates")) not in NOT_FOR_READERS
        for words in [outside_gettext(path.read_text(), path.name)]
        if words
    }
    assert untranslated == {}
    assert outside_gettext("<p>Hello {{ name }}</p><p>{% trans %}Hi{% endtrans %}</p>", "x.html") == ["Hello"]


def test_the_catalog_template_is_current_and_every_language_is_complete(tmp_path: Path) -> None:
    """`pybabel extract` (as the README runs it) finds exactly the committed messages.pot, and each language
    translates all of it with the same placeholders."""
    extracted = tmp_path / "messages.pot"
    subprocess.run(
        [sys.executable, "-m", "babel.messages.frontend", "extract", "-F", "babel.cfg", "-k", "N_", "--no-location",
         "--sort-output", "-o", str(extracted), "."],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    with extracted.open("rb") as file:
        assert {m.id for m in read_po(file)} == {m.id for m in template()}, "run the README's pybabel extract/update"
    for language in LANGUAGES:
        translated = catalog(language)
        assert {m.id for m in translated} == {m.id for m in template()}, language
        missing = [m.id for m in translated if m.id and (m.fuzzy or not all(_strings(m.string)))]
        assert missing == [], language
        problems = [(m.id, errors) for m, errors in translated.check()]
        assert problems == [], language


def _strings(string: str | tuple[str, ...]) -> tuple[str, ...]:
    return string if isinstance(string, tuple) else (string,)


def english_probes(language: str) -> Iterator[str]:
    """Pieces of each English string of two words or more, where LANGUAGE's catalog says something else."""
    translated = catalog(language)
    for message in translated:
        if not message.id:
            continue
        english = message.id[0] if isinstance(message.id, tuple) else message.id
        if english in _strings(message.string):
            continue  # the same in both languages, on purpose
        for piece in re.split(r"%\(\w+\)[sd]|<[^>]+>", english):
            piece = " ".join(piece.split()).strip(" .,:;?")
            if len(piece.split()) >= 2:
                yield piece


def english_left(text: str, language: str) -> list[str]:
    plain = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split())
    return sorted({probe for probe in english_probes(language) if probe in plain})


@pytest.fixture(params=LANGUAGES)
def language(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def extra_config() -> str:
    today = datetime.now(UTC).strftime("%A").lower()
    return f'[digest]\nsend_hour = 0\nweekday = "{today}"\ntimezone = "UTC"\n'


def test_every_page_and_email_reads_in_the_sites_language(site, smtp, run, feed, language: str) -> None:
    """A reader's whole journey in LANGUAGE: no English sentence left on any page or in any email, the
    page's language declared, and subject lines encoded as RFC 2047 asks for non-ASCII words."""
    said = Language(language)
    pages: dict[str, str] = {}

    def keep(name: str, response, status: int = 200) -> None:
        assert response.status_code == status, (name, response.text[:500])
        assert f'<html lang="{language}">' in response.text, name
        assert response.headers["Content-Language"] == language, name
        pages[name] = response.text

    assert run("posts", "fetch").exit_code == 0
    keep("subscribe", site.get("/"))
    keep("address refused", site.post("/subscribe", data=site.form("no-at-sign")), 400)
    keep("form too quick", site.post("/subscribe", data=site.form("ada@example.com", opened_ago=0)), 400)
    keep("check inbox", site.subscribe("ada@example.com"))
    keep("check inbox", site.subscribe("bea@example.com"))
    site.deliver_outbox()
    keep("confirm", site.get(confirm_link(smtp.to("ada@example.com")[0])))
    keep("confirmed", site.press(confirm_link(smtp.to("ada@example.com")[0])))
    keep("already confirmed", site.get(confirm_link(smtp.to("ada@example.com")[0])))
    keep("confirmed daily", site.press(confirm_link(smtp.to("bea@example.com")[0]), data={"frequency": "daily"}))
    keep("bad confirm link", site.get("/confirm/not-a-token"), 400)
    keep("bad unsubscribe link", site.get("/unsubscribe/not-a-token"), 400)
    keep("bad manage link", site.get("/manage/not-a-token"), 400)
    keep("not found", site.get("/no-such-page"), 404)
    keep("manage: ask", site.get("/manage"))
    keep("manage: sent", site.press("/manage", data={"email": "ada@example.com"}))
    site.deliver_outbox()
    manage_link = next(link for link in smtp.to("ada@example.com")[-1].links() if "/manage/" in link)
    keep("manage", site.get(manage_link))
    keep("manage: saved", site.press(manage_link, data={"frequency": "instant"}))
    keep("manage: erase unticked", site.press(f"{manage_link}/erase", page=manage_link), 400)
    publish(feed, "Storm warning", "storm")
    publish(feed, "Calm after", "calm")
    assert run("send").exit_code == 0
    unsubscribe_link = next(link for link in smtp.to("ada@example.com")[-1].links() if "/unsubscribe/" in link)
    keep("unsubscribe", site.get(unsubscribe_link))
    keep("unsubscribed", site.press(unsubscribe_link))
    keep("archive", site.get("/archive"))
    embed = run("embed")
    assert embed.exit_code == 0

    def expected(subject: str, **values: object) -> str:
        """SUBJECT translated, as a header carries it: spaces of any kind (French puts no-break ones before
        colons) become one plain space."""
        return " ".join(said.gettext(subject, name="Harbour Notes", **values).split())

    subjects = {
        expected("Confirm your subscription to %(name)s"),
        expected("You're subscribed to %(name)s"),
        expected("Manage your subscription to %(name)s"),
        "Storm warning",
        "Calm after",
    }
    digest = [m.message["Subject"] for m in smtp.to("bea@example.com") if m.message["Subject"] not in subjects]
    assert digest in (
        [
            " ".join(
                said.ngettext(
                    "%(digest)s from %(name)s: %(title)s and %(num)d more",
                    "%(digest)s from %(name)s: %(title)s and %(num)d more",
                    1,
                    digest=said.gettext("Daily digest"),
                    name="Harbour Notes",
                    title=first,
                ).split()
            )
        ]
        for first in ("Storm warning", "Calm after")
    )
    assert {m.message["Subject"] for m in smtp.messages} == subjects | set(digest)
    for caught in smtp.messages:
        raw = caught.raw.split(b"\r\n\r\n", 1)[0].decode("ascii")  # raises if a header is not 7-bit
        subject = caught.message["Subject"]
        if not subject.isascii():
            assert re.search(r"^Subject: =\?utf-8\?[bq]\?", raw, re.M | re.I), raw
        pages[f"email: {subject} (text)"] = caught.text
        pages[f"email: {subject} (html)"] = caught.html
        assert f'<html lang="{language}">' in caught.html, subject
    pages["embed"] = embed.output
    assert said.date(datetime(2025, 4, 1)) in pages["archive"]  # the feed's pubDate, as the locale writes it

    leftovers = {name: found for name, text in pages.items() if (found := english_left(text, language))}
    assert leftovers == {}


OWN_CATALOG = """
msgid "Subscribe"
msgstr "Jetzt abonnieren"
"""


@pytest.fixture
def owner_strings() -> str:
    return ""


@pytest.fixture
def config_file(config_file: Path, language: str, owner_strings: str, tmp_path: Path) -> Path:
    settings = f'language = "{language}"\n'
    if owner_strings:
        own = tmp_path / "own" / "translations" / language / "LC_MESSAGES"
        own.mkdir(parents=True)
        (own / "messages.po").write_text(owner_strings)
        settings += f'templates_dir = "{tmp_path / "own"}"\n'
    config_file.write_text(config_file.read_text().replace("[site]\n", f"[site]\n{settings}", 1))
    return config_file


@pytest.mark.parametrize("language, owner_strings", [("de", OWN_CATALOG)])
def test_an_owner_catalog_overrides_any_string(site, language: str) -> None:
    """A messages.po in [site] templates_dir/translations/<language>/LC_MESSAGES wins over the package's,
    string by string; the rest stay as shipped."""
    page = site.get("/").text
    assert '<button type="submit">Jetzt abonnieren</button>' in page
    shipped = Language("de")
    assert shipped.gettext("Email address") in page and shipped.gettext("Email address") != "Email address"


@pytest.mark.parametrize(
    "language, problem",
    [
        ("xx-nowhere", "is not a language code such as de, fr or pt-BR"),
        ("pt-BR", "there is no catalog for 'pt-BR': use one of en, de, es, fr, ja, or put your own at "
         "templates_dir/translations/pt_BR/LC_MESSAGES/messages.po"),
    ],
)  # fmt: skip
def test_a_language_without_a_catalog_is_refused_with_what_to_do(config_file: Path, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_config(config_file)


def test_english_variants_need_no_catalog_and_write_dates_their_way() -> None:
    assert Language("en-GB").date(datetime(2026, 12, 3)) == "3 December 2026"
    assert Language("en").date(datetime(2026, 12, 3)) == "December 3, 2026"
    assert Language("de").date(datetime(2026, 12, 3)) == "3. Dezember 2026"
    assert Language("ja").date(datetime(2026, 12, 3)) == "2026年12月3日"
