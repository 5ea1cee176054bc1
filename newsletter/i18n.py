"""The site's language: gettext catalogs for every reader-facing string, and dates written for the locale.

Catalogs live in the package (translations/<language>/LC_MESSAGES/messages.po). An owner's own catalog at
[site] templates_dir/translations/<language>/LC_MESSAGES/messages.po (or a compiled messages.mo alone) overrides
any string of it without a fork. Strings are English in the code; English needs no catalog.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterable
from datetime import date, datetime
from pathlib import Path
from typing import Any

from babel import Locale, UnknownLocaleError
from babel.dates import format_date
from babel.lists import format_list
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import NullTranslations, Translations
from jinja2 import Environment

DOMAIN = "messages"
CATALOGS = Path(__file__).resolve().parent / "translations"


def N_(message: str) -> str:  # gettext's name for "translated later"
    """Marks MESSAGE for the catalog where it is written; it is translated where it is shown."""
    return message


def shipped() -> list[str]:
    """The languages the package has catalogs for, English first."""
    return ["en", *sorted(path.name for path in CATALOGS.iterdir() if path.is_dir())]


def _read(folder: Path, language: str) -> NullTranslations | None:
    """The catalog of LANGUAGE in FOLDER: its messages.po, else a compiled messages.mo, else None."""
    base = folder / language / "LC_MESSAGES" / DOMAIN
    if base.with_suffix(".po").is_file():
        with base.with_suffix(".po").open("rb") as file:
            catalog = read_po(file, locale=language)
        compiled = io.BytesIO()
        write_mo(compiled, catalog)
        compiled.seek(0)
        return Translations(compiled, DOMAIN)
    if base.with_suffix(".mo").is_file():
        with base.with_suffix(".mo").open("rb") as file:
            return Translations(file, DOMAIN)
    return None


def _folders(templates_dir: str) -> list[Path]:
    """Where catalogs are looked for, the owner's first."""
    return ([Path(templates_dir).expanduser() / "translations"] if templates_dir else []) + [CATALOGS]


def _names(locale: Locale) -> list[str]:
    """The catalog folders that serve LOCALE: pt_BR's own, then pt's."""
    return list(dict.fromkeys([str(locale), locale.language]))


@functools.cache
def translations(code: str, templates_dir: str = "") -> NullTranslations:
    """The strings of language CODE: the owner's catalog in TEMPLATES_DIR first, then the package's, then
    English (the msgids themselves)."""
    found = NullTranslations()
    locale = locale_of(code)
    for folder in reversed(_folders(templates_dir)):
        for name in reversed(_names(locale)):
            catalog = _read(folder, name)
            if catalog is not None:
                catalog.add_fallback(found)
                found = catalog
    return found


def locale_of(code: str) -> Locale:
    """The Babel locale [site] language names ("de", "pt-BR", "pt_BR"); ValueError when there is none."""
    try:
        return Locale.parse(code.replace("-", "_"))
    except (ValueError, UnknownLocaleError) as exc:
        raise ValueError(f"{code!r} is not a language code such as de, fr or pt-BR") from exc


def missing_catalog(code: str, templates_dir: str = "") -> str | None:
    """Why CODE cannot be the site's language, or None when it can."""
    try:
        locale = locale_of(code)
    except ValueError as exc:
        return str(exc)
    folders = _folders(templates_dir)
    if locale.language == "en" or any((f / name / "LC_MESSAGES").is_dir() for f in folders for name in _names(locale)):
        return None
    return (
        f"there is no catalog for {code!r}: use one of {', '.join(shipped())}, or put your own at "
        f"templates_dir/translations/{locale}/LC_MESSAGES/messages.po"
    )


class Language:
    """One site language: its strings and its way of writing dates."""

    def __init__(self, code: str, templates_dir: str = "") -> None:
        self.locale = locale_of(code)
        self.code = str(self.locale).replace("_", "-")  # as <html lang> and Content-Language write it
        self.strings = translations(code, templates_dir)

    def gettext(self, message: str, **values: Any) -> str:
        """MESSAGE in this language, with %(name)s placeholders filled from VALUES."""
        text = self.strings.gettext(message)
        return text % values if values else text

    def ngettext(self, singular: str, plural: str, count: int, **values: Any) -> str:
        return self.strings.ngettext(singular, plural, count) % {"num": count, **values}

    def reason(self, message: str, fallback: str) -> str:
        """MESSAGE in this language, or FALLBACK's translation where the catalog lacks MESSAGE (a library's words)."""
        text = self.strings.gettext(message)
        if text != message or self.locale.language == "en":
            return text
        return self.strings.gettext(fallback)

    def list(self, items: Iterable[str]) -> str:
        """ "a, b and c" as this language writes a list."""
        return format_list(list(items), locale=self.locale)

    def date(self, value: date | datetime | None, format: str = "long") -> str:  # Babel's name
        """VALUE as a reader of this language writes it: "3 December 2026", "3. Dezember 2026"."""
        if value is None:
            return ""
        return format_date(value, format=format, locale=self.locale)

    def install(self, environment: Environment) -> None:
        """Give ENVIRONMENT's templates {% trans %}, _() and ngettext() in this language, and a `date` filter."""
        environment.add_extension("jinja2.ext.i18n")
        environment.policies["ext.i18n.trimmed"] = True
        environment.install_gettext_translations(self.strings, newstyle=True)  # type: ignore[attr-defined]
        environment.filters["date"] = self.date
        environment.globals["language"] = self.code
