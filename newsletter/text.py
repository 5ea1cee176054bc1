"""Untrusted text made fit for one line: a header, a database column, an identifier."""

from __future__ import annotations

import re

CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
MAX_SUBJECT = 200
_URL_PASSWORD = re.compile(r"(\w[\w+.-]*://[^:/@\s]*:)[^@\s]*@")


def has_controls(value: str) -> bool:
    return CONTROL.search(value) is not None


def strip_controls(value: str) -> str:
    return CONTROL.sub("", value)


def header_text(value: str, limit: int = MAX_SUBJECT) -> str:
    """Make untrusted text safe for a header: one line, no controls, no encoded-word tricks."""
    text = CONTROL.sub(" ", value).replace("=?", "= ?")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def hide_password(text: str) -> str:
    """TEXT with the password of every URL in it (scheme://user:password@host) shown as ***."""
    return _URL_PASSWORD.sub(r"\1***@", text)


def clean_field(value: str | None, length: int) -> str | None:
    """VALUE cut to LENGTH, without control characters (NUL cannot be stored by PostgreSQL)."""
    return CONTROL.sub("", value)[:length] or None if value else None
