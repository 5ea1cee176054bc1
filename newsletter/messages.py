"""Render emails to the exact bytes that go over SMTP.

A notification is rendered once per post, its CSS inlined and its bodies quoted-printable encoded then; for
each recipient only the To, Message-ID and their links are filled in, so a message costs the joining of its
bytes and the re-cutting of the few lines that hold a link.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid
from typing import Protocol
from urllib.parse import urlsplit

import css_inline

from .config import Config
from .i18n import N_, Language
from .sanitize import image_sources
from .text import header_text

log = logging.getLogger(__name__)

ENCODED_WORD_BYTES = 45  # base64 of 45 bytes is 60 characters: "=?utf-8?b?" + 60 + "?=" is 72

Render = Callable[..., str]

# The whole <style> block stays: mail apps that read it get the media query, and a short email with an image
# (the logo) is not taken for an image-only one (SpamAssassin's HTML_IMAGE_ONLY_* count the HTML's bytes).
_INLINER = css_inline.CSSInliner(keep_style_tags=True, keep_link_tags=True, load_remote_stylesheets=False)


class PostLike(Protocol):
    """What a notification shows of a post."""

    @property
    def id(self) -> int: ...
    @property
    def title(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def summary_html(self) -> str: ...


class DatedPostLike(PostLike, Protocol):
    """What a digest shows of a post."""

    @property
    def published_at(self) -> datetime | None: ...


def encoded_words(text: str, separator: str = "\r\n ") -> str:
    """Non-ASCII header text as RFC 2047 encoded-words of at most 75 characters each."""
    chunks, chunk = [], ""
    for char in text:
        if len((chunk + char).encode()) > ENCODED_WORD_BYTES:
            chunks.append(chunk)
            chunk = char
        else:
            chunk += char
    chunks.append(chunk)
    return separator.join(f"=?utf-8?b?{base64.b64encode(c.encode()).decode()}?=" for c in chunks)


def _phrase(text: str) -> str:
    """A display name: quoted when ASCII, encoded-words otherwise."""
    if not text.isascii():
        return encoded_words(text, " ")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unstructured(name: str, text: str) -> bytes:
    """NAME: TEXT, encoded when not ASCII and folded at spaces to keep lines within 78 characters."""
    if not text.isascii():
        return f"{name}: {encoded_words(text)}\r\n".encode("ascii")
    lines, line = [], f"{name}:"
    for word in text.split(" "):
        if len(line) + 1 + len(word) > 78 and line.strip() != f"{name}:":
            lines.append(line)
            line = ""
        line += " " + word
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def inline_css(html: str) -> str:
    """HTML with the rules of its <style> blocks copied onto the elements they apply to, for mail clients that
    drop <style> (the block stays for those that read it); unchanged, with a warning, when unreadable."""
    try:
        return _INLINER.inline(html)
    except css_inline.InlineError as exc:
        log.warning("the email's CSS was not inlined: %s", exc)
        return html


def list_id(config: Config) -> str:
    host = urlsplit(config.base_url).hostname or "localhost"
    return f"{_phrase(f'{config.site.name} new posts')} <newposts.{host}>"


def _header(name: str, value: str) -> bytes:
    """One unfolded header line: URLs stay whole, as mail providers expect of List-Unsubscribe (MSG-14)."""
    return f"{name}: {value}\r\n".encode("ascii")


@dataclass(frozen=True)
class RecipientLinks:
    """Where a template's per-recipient links go until each recipient's are filled in: made anew, at random,
    for each template, so no text in a post can know them and have a reader's link put in its place."""

    unsubscribe: str
    manage: str
    confirm: str

    @classmethod
    def new(cls) -> RecipientLinks:
        marker = f"@@{secrets.token_hex(16)}"
        return cls(f"{marker}-unsubscribe@@", f"{marker}-manage@@", f"{marker}-confirm@@")


# A body as it is stored in a template: encoded lines, each run of them joined (bytes), and each line with
# recipient links as a tuple of its encoded pieces (bytes) and the names of the links between them (str).
Body = list[bytes | tuple[bytes | str, ...]]
QP_LINE = 76  # characters of an encoded line, soft break included (RFC 2045)
_QP_SAFE = re.compile(rb"[!-<>-~]*")  # printable ASCII but "=": quoted-printable as it is


def _qp_lines(text: str, links: RecipientLinks | None) -> Body:
    """TEXT quoted-printable encoded, a body encoded once per template: only the links of LINKS are left to
    fill in for each recipient (_fill)."""
    lines = text.replace("\r\n", "\n").split("\n")
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()
    names = {links.unsubscribe: "unsubscribe", links.manage: "manage", links.confirm: "confirm"} if links else {}
    marker = re.compile("|".join(map(re.escape, names))) if names else None
    body: Body = []
    for line in lines:
        if marker is not None and marker.search(line):
            pieces = re.split(f"({marker.pattern})", line)
            body.append(tuple(names[piece] if i % 2 else _escaped(piece) for i, piece in enumerate(pieces)))
        elif body and isinstance(body[-1], bytes):
            body[-1] += _qp_line(line)
        else:
            body.append(_qp_line(line))
    return body


def _escaped(text: str) -> bytes:
    """TEXT (one line, without its line break) quoted-printable escaped, not yet cut to length."""
    return binascii.b2a_qp(text.encode("utf-8"), istext=True).replace(b"=\n", b"")


def _qp_line(line: str) -> bytes:
    """LINE quoted-printable, CRLF-terminated, with a dot that would start a line written =2E: the message then
    needs no dot-stuffing on the wire (mailer.Envelope.wire_ready)."""
    return _soft_wrapped(_escaped(line))


def _soft_wrapped(encoded: bytes) -> bytes:
    """An escaped line cut by soft breaks into lines of at most QP_LINE characters, whole =XX escapes only,
    none starting with a dot; with its CRLF."""
    if len(encoded) < QP_LINE and encoded[:1] != b".":
        return encoded + b"\r\n"
    physical, start = [], 0
    while True:
        head = b""
        if encoded[start : start + 1] == b".":
            head, start = b"=2E", start + 1
        room = QP_LINE - len(head)
        if len(encoded) - start <= room:
            physical.append(head + encoded[start:] + b"\r\n")
            return b"".join(physical)
        cut = start + room - 1  # one place is kept for the soft break's "="
        if encoded[cut - 1 : cut] == b"=":
            cut -= 1
        elif encoded[cut - 2 : cut - 1] == b"=":
            cut -= 2
        physical.append(head + encoded[start:cut] + b"=\r\n")
        start = cut


def _fill(body: Body, links: dict[str, bytes]) -> bytes:
    """The encoded BODY with each recipient link named in it replaced by its value in LINKS (escaped)."""
    return b"".join(
        part
        if isinstance(part, bytes)
        else _soft_wrapped(b"".join(links[piece] if isinstance(piece, str) else piece for piece in part))
        for part in body
    )


def _link(url: str | None) -> bytes:
    """URL as it goes in a quoted-printable line ("" when there is none)."""
    if not url:
        return b""
    raw = url.encode("utf-8")
    return raw if _QP_SAFE.fullmatch(raw) else _escaped(url)


@dataclass(frozen=True)
class MessageTemplate:
    """Headers and encoded bodies of one email with the per-recipient parts left open."""

    sender: str
    domain: str
    head: bytes
    text: Body
    html: Body
    boundary: str

    def render(
        self,
        recipient: str,
        message_id: str,
        unsubscribe_url: str | None = None,
        manage_url: str | None = None,
        unsubscribe_mailto: str | None = None,
        confirm_url: str | None = None,
    ) -> bytes:
        """The message to RECIPIENT; a list email's List-Unsubscribe offers UNSUBSCRIBE_URL first, then, when
        given, UNSUBSCRIBE_MAILTO (for mail apps that unsubscribe by email)."""
        head = [self.head, _header("To", recipient), _header("Message-ID", message_id)]
        links = {"unsubscribe": _link(unsubscribe_url), "manage": _link(manage_url), "confirm": _link(confirm_url)}
        if unsubscribe_url is not None:
            mailto = f", <{unsubscribe_mailto}>" if unsubscribe_mailto else ""
            head += [
                _header("List-Unsubscribe", f"<{unsubscribe_url}>{mailto}"),
                b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
            ]
        b = self.boundary.encode()
        return b"".join(
            [
                *head,
                b'Content-Type: multipart/alternative; boundary="',
                b,
                b'"\r\n\r\n',
                b"--",
                b,
                b'\r\nContent-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n',
                _fill(self.text, links),
                b"--",
                b,
                b'\r\nContent-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n',
                _fill(self.html, links),
                b"--",
                b,
                b"--\r\n",
            ]
        )

    def new_message_id(self) -> str:
        return make_msgid(domain=self.domain)


def message_template(
    config: Config,
    subject: str,
    text: str,
    html: str,
    extra_headers: bytes = b"",
    links: RecipientLinks | None = None,
) -> MessageTemplate:
    """An email with its bodies encoded; LINKS mark where each recipient's own links go."""
    sender = config.from_address
    sender_name = f"{_phrase(sender.display_name)} " if sender.display_name else ""
    head = b"".join(
        [
            _header("From", f"{sender_name}<{sender.addr_spec}>"),
            _unstructured("Subject", header_text(subject)),
            _header("Date", format_datetime(datetime.now(UTC))),
            b"MIME-Version: 1.0\r\nAuto-Submitted: auto-generated\r\n",
        ]
    )
    return MessageTemplate(
        sender=sender.addr_spec,
        domain=sender.domain,
        head=head + extra_headers,
        text=_qp_lines(text, links),
        html=_qp_lines(html, links),
        boundary="=_" + secrets.token_hex(12),
    )


def notification_context(config: Config, post: PostLike) -> dict[str, object]:
    """What templates/email/notification.* show besides the post: its body (the summary, or with [site]
    email_content = "full" the whole post when the feed carries it) and its featured image, unless the body
    shows that image already.

    A post's author, published_at, image_url and content_html are read when it has them (a sample has not).
    """
    content = getattr(post, "content_html", None) or ""
    body = content if config.site.email_content == "full" and content else post.summary_html
    image = getattr(post, "image_url", None) or ""
    return {"post": post, "body_html": body, "featured_image": "" if image in image_sources(body) else image}


def notification_template(config: Config, render: Render, post: PostLike) -> MessageTemplate:
    """The new-post email for every recipient; fill in with render(to, message_id, unsubscribe_url, manage_url)."""
    archive_url = f"{config.base_url}/archive/{post.id}" if config.site.archive else None
    return _list_template(
        config, render, "notification", post.title, archive_url=archive_url, **notification_context(config, post)
    )


DIGEST_NAMES = {"daily": N_("Daily digest"), "weekly": N_("Weekly digest"), "instant": N_("Posts you missed")}


def digest_template(
    config: Config, render: Render, language: Language, frequency: str, posts: Sequence[DatedPostLike]
) -> MessageTemplate:
    """A digest of POSTS (oldest first) for every reader who gets the same ones, filled in like a notification."""
    name = language.gettext(DIGEST_NAMES[frequency])
    values = {"digest": name, "name": config.site.name, "title": posts[0].title}
    if len(posts) > 1:
        subject = language.ngettext(
            "%(digest)s from %(name)s: %(title)s and %(num)d more",
            "%(digest)s from %(name)s: %(title)s and %(num)d more",
            len(posts) - 1,
            **values,
        )
    else:
        subject = language.gettext("%(digest)s from %(name)s: %(title)s", **values)
    archive_url = f"{config.base_url}/archive" if config.site.archive else None
    return _list_template(
        config, render, "digest", subject, posts=posts, digest_name=name, frequency=frequency, archive_url=archive_url
    )


def _list_template(config: Config, render: Render, name: str, subject: str, **context: object) -> MessageTemplate:
    """An email to the list from templates/email/NAME.{txt,html}, with each reader's links left open: the CSS
    is inlined here, once, and the links are filled in afterwards."""
    links = RecipientLinks.new()
    context = {**context, "unsubscribe_url": links.unsubscribe, "manage_url": links.manage}
    return message_template(
        config,
        subject,
        render(f"email/{name}.txt", **context),
        inline_css(render(f"email/{name}.html", **context)),
        _header("List-Id", list_id(config)) + b"Precedence: bulk\r\n",
        links,
    )


def single_template(config: Config, render: Render, name: str, subject: str, **context: object) -> MessageTemplate:
    """A one-off email (confirmation, welcome) from templates/email/NAME.{txt,html}; a confirmation link not
    given in CONTEXT is left to fill in (MessageTemplate.render's confirm_url)."""
    links = RecipientLinks.new()
    context = {"confirm_url": links.confirm, **context}
    html = inline_css(render(f"email/{name}.html", **context))
    return message_template(config, subject, render(f"email/{name}.txt", **context), html, links=links)


def single_message(config: Config, render: Render, name: str, subject: str, recipient: str, **context: object) -> bytes:
    """A one-off email (confirmation, welcome) from templates/email/NAME.{txt,html}."""
    template = single_template(config, render, name, subject, **context)
    return template.render(recipient, template.new_message_id())
