"""Feed HTML made safe for email (nh3), and its plain-text rendering."""

from __future__ import annotations

import html as htmllib
import re
from html.parser import HTMLParser
from urllib.parse import urljoin

import nh3

ALLOWED_TAGS = {
    "a",
    "abbr",
    "b",
    "blockquote",
    "br",
    "code",
    "em",
    "figcaption",
    "h2",
    "h3",
    "h4",
    "hr",
    "i",
    "img",
    "li",
    "ol",
    "p",
    "pre",
    "q",
    "s",
    "small",
    "strong",
    "sub",
    "sup",
    "u",
    "ul",
    "table",
    "caption",
    "thead",
    "tbody",
    "tfoot",
    "tr",
    "th",
    "td",
}
ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"},
    "img": {"src", "alt", "width", "height"},
    "abbr": {"title"},
    "td": {"colspan", "rowspan"},
    "th": {"colspan", "rowspan"},
}
BLOCKS = {"p", "div", "blockquote", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "figure", "hr", "table"}
CELLS = {"td", "th"}
_TAG = re.compile(r"<[^>]*>")


def clean_html(fragment: str, base_url: str | None = None) -> str:
    """Keep simple formatting, links and images; drop scripts, styles, forms, event handlers, javascript: URLs.

    Relative links and image sources are made absolute against BASE_URL, since an email has no page to be
    relative to.
    """

    def absolute(tag: str, attribute: str, value: str) -> str:
        return urljoin(base_url, value) if base_url and attribute in ("href", "src") else value

    return nh3.clean(
        fragment,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        attribute_filter=absolute,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer",
        clean_content_tags={"script", "style", "noscript", "template", "iframe", "object"},
    ).strip()


class _TextWriter(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.href: str | None = None
        self.link_text: list[str] = []
        self.cells = 0  # in the current table row

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in BLOCKS:
            self.parts.append("\n\n")
        elif tag in ("br", "tr", "caption"):
            self.parts.append("\n")
            self.cells = 0
        elif tag in CELLS:
            self.parts.append(" | " if self.cells else "")
            self.cells += 1
        elif tag == "li":
            self.parts.append("\n- ")
        elif tag == "a":
            self.href, self.link_text = dict(attrs).get("href"), []

    def handle_endtag(self, tag: str) -> None:
        if tag in BLOCKS:
            self.parts.append("\n\n")
        elif tag == "a" and self.href:
            if "".join(self.link_text).strip() != self.href:
                self.parts.append(f" ({self.href})")
            self.href = None

    def handle_data(self, data: str) -> None:
        self.parts.append(data)
        if self.href is not None:
            self.link_text.append(data)


class _ImageSources(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img" and (src := dict(attrs).get("src")):
            self.sources.append(src)


def image_sources(fragment: str) -> list[str]:
    """The src of each <img> in FRAGMENT, in order, with entities decoded."""
    parser = _ImageSources()
    parser.feed(fragment)
    parser.close()
    return parser.sources


def html_to_text(fragment: str) -> str:
    writer = _TextWriter()
    writer.feed(fragment)
    writer.close()
    text = re.sub(r"[ \t]+", " ", "".join(writer.parts))
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def html_to_line(fragment: str) -> str:
    """The text a reader sees for an HTML title, on one line.

    Entities are decoded twice: feeds that escape their titles once too often (`&amp;amp;`, `&amp;#8217;`)
    are common, and a title rarely means an entity's name literally.
    """
    marked = nh3.clean(fragment, tags=BLOCKS | {"br", "li"}, attributes={})
    text = htmllib.unescape(htmllib.unescape(_TAG.sub(" ", marked)))
    return " ".join(text.split())


def plain_to_html(text: str) -> str:
    """A hand-written summary given as plain text, as HTML paragraphs."""
    text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", text)
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return "".join(f"<p>{htmllib.escape(p)}</p>" for p in paragraphs)
