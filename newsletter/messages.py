"""Render emails to the exact bytes that go over SMTP.

A notification is rendered once per post; for each recipient only the To, Message-ID and unsubscribe
link are filled in, so a large list costs a string replace and a quoted-printable encode per message.
"""

from __future__ import annotations

import binascii
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from email.header import Header
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from typing import Callable
from urllib.parse import urlsplit

from .config import Config

UNSUBSCRIBE_PLACEHOLDER = "@@unsubscribe-url@@"
MAX_SUBJECT = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")

Render = Callable[..., str]


def header_text(value: str, limit: int = MAX_SUBJECT) -> str:
    """Make untrusted text safe for a header: one line, no controls, no encoded-word tricks."""
    text = _CONTROL.sub(" ", value).replace("=?", "= ?")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def list_id(config: Config) -> str:
    phrase = f"{config.site.name} new posts"
    host = urlsplit(config.base_url).hostname or "localhost"
    label = phrase if phrase.isascii() else Header(phrase, "utf-8").encode()
    return f"{_quote(label) if phrase.isascii() else label} <newposts.{host}>"


def _quote(phrase: str) -> str:
    return '"' + phrase.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _header(name: str, value: str) -> bytes:
    """One unfolded header line: URLs stay whole, as mail providers expect of List-Unsubscribe (MSG-14)."""
    return f"{name}: {value}\r\n".encode("ascii")


def _qp(text: str) -> bytes:
    body = text.replace("\r\n", "\n").replace("\n", "\r\n")
    if not body.endswith("\r\n"):
        body += "\r\n"
    return binascii.b2a_qp(body.encode("utf-8"), istext=True)


@dataclass(frozen=True)
class MessageTemplate:
    """Headers and bodies of one email with the per-recipient parts left open."""

    sender: str
    domain: str
    head: bytes
    text: str
    html: str
    boundary: str

    def render(self, recipient: str, message_id: str, unsubscribe_url: str | None = None) -> bytes:
        text, html, head = self.text, self.html, [self.head, _header("To", recipient), _header("Message-ID", message_id)]
        if unsubscribe_url is not None:
            text = text.replace(UNSUBSCRIBE_PLACEHOLDER, unsubscribe_url)
            html = html.replace(UNSUBSCRIBE_PLACEHOLDER, unsubscribe_url)
            head += [_header("List-Unsubscribe", f"<{unsubscribe_url}>"),
                     b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"]
        b = self.boundary.encode()
        return b"".join([
            *head,
            b'Content-Type: multipart/alternative; boundary="', b, b'"\r\n\r\n',
            b"--", b, b'\r\nContent-Type: text/plain; charset="utf-8"\r\n'
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n", _qp(text),
            b"--", b, b'\r\nContent-Type: text/html; charset="utf-8"\r\n'
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n", _qp(html),
            b"--", b, b"--\r\n",
        ])

    def new_message_id(self) -> str:
        return make_msgid(domain=self.domain)


def message_template(config: Config, subject: str, text: str, html: str, extra_headers: bytes = b"") -> MessageTemplate:
    sender = config.from_address
    headers = EmailMessage(policy=SMTP)
    headers["From"] = sender
    headers["Subject"] = header_text(subject)
    headers["Date"] = format_datetime(datetime.now(timezone.utc))
    headers["MIME-Version"] = "1.0"
    headers["Auto-Submitted"] = "auto-generated"
    return MessageTemplate(
        sender=sender.addr_spec,
        domain=sender.domain,
        head=bytes(headers)[:-2] + extra_headers,
        text=text,
        html=html,
        boundary="=_" + secrets.token_hex(12),
    )


def notification_template(config: Config, render: Render, post: object) -> MessageTemplate:
    """The new-post email for every recipient; fill in with render(to, message_id, unsubscribe_url)."""
    context = {"post": post, "unsubscribe_url": UNSUBSCRIBE_PLACEHOLDER}
    return message_template(config, post.title,  # type: ignore[attr-defined]
                            render("email/notification.txt", **context),
                            render("email/notification.html", **context),
                            _header("List-Id", list_id(config)) + b"Precedence: bulk\r\n")


def single_message(config: Config, render: Render, name: str, subject: str, recipient: str, **context: object) -> bytes:
    """A one-off email (confirmation, welcome) from templates/email/NAME.{txt,html}."""
    template = message_template(config, subject, render(f"email/{name}.txt", **context),
                                render(f"email/{name}.html", **context))
    return template.render(recipient, template.new_message_id())
