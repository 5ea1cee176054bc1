"""Mail that comes back: bounces to the VERP return path, spam complaints (ARF), mailto unsubscribes.

Every email to a reader is sent from `<[bounces] address's local part>+<token>@<its domain>`, the token naming
that email (tokens.return_token), and list emails offer `mailto:unsubscribe+<token>@<domain>`; whatever the MTA
hands back to those addresses is judged here. Policy, after RFC 3463 and Mailman's bounce scoring:

- a permanent failure (5.x.x) marks the reader bounced at once, except 5.7.x (the receiving side's policy about
  us: SPF, DKIM, DMARC, reputation), which is logged for the owner and not held against the reader, and 5.2.2
  (mailbox full), which counts as temporary;
- a temporary failure (4.x.x, a "delayed" notice) or a bounce nobody can parse adds SOFT_POINTS to the reader's
  score, at most once a day; reaching BOUNCED_SCORE marks them bounced; a bounce more than SCORE_WINDOW after
  the previous one starts the count again;
- an abuse report unsubscribes the reader at once and records the complaint;
- any mail to an unsubscribe address with a valid token unsubscribes its reader;
- automatic replies (RFC 3834, vacation and out-of-office notes) and anything unrecognised are ignored.
"""

from __future__ import annotations

import email
import email.policy
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import Message
from typing import cast

from flufl.bounce import all_failures
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from .models import Delivery, Digest, OutboxMessage, Status, Subscriber, utcnow
from .runtime import Newsletter
from .subscriptions import Requester, unsubscribe
from .tokens import RETURN_TOKEN_TEXT, InvalidToken, ReturnClaim

log = logging.getLogger(__name__)
# flufl.bounce logs every detector it runs, and a traceback for each that trips over an ordinary email
logging.getLogger("flufl.bounce").setLevel(logging.CRITICAL)

SOFT_POINTS = 1.0
BOUNCED_SCORE = 3.0
SCORE_WINDOW = timedelta(days=14)
TEXT_KEPT = 1024
ENHANCED_STATUS = re.compile(r"\b([245])\.([0-9]{1,3})\.([0-9]{1,3})\b")
AUTO_REPLY_SUBJECT = re.compile(
    r"^\s*(auto(matic)?[ -]?(reply|response|antwort)|out of (the )?office|abwesenheit|vacation|absence)\b|^\s*auto:",
    re.IGNORECASE,
)
ADDRESS_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "To", "Cc")
LEDGERS: dict[str, type[Delivery] | type[Digest] | type[OutboxMessage]] = {
    "d": Delivery,
    "g": Digest,
    "o": OutboxMessage,
}


@dataclass(frozen=True)
class Outcome:
    """What one message did: `action` is bounced, soft bounce, policy bounce, complaint, unsubscribed or
    ignored; `detail` says about whom or why, in one line."""

    action: str
    detail: str

    def __str__(self) -> str:
        return f"{self.action}: {self.detail}"


class Unavailable(Exception):
    """The database cannot be used now; the mail server should keep the message and try again."""


def handle(nl: Newsletter, raw: bytes, recipient: str = "") -> Outcome:
    """Judge one message that arrived for RECIPIENT (the envelope recipient when the MTA says it; else the
    message's own headers tell) and record what it means; Unavailable when the database cannot be used."""
    try:
        return _judge(nl, raw, recipient)
    except DBAPIError as exc:
        raise Unavailable(" ".join(str(exc.orig or exc).split())[:200]) from None


def _judge(nl: Newsletter, raw: bytes, recipient: str) -> Outcome:
    try:
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
        addressed = " ".join([recipient, *(str(v) for name in ADDRESS_HEADERS for v in message.get_all(name, []))])
        report = (message.get_param("report-type", header="content-type") or "") if message.is_multipart() else ""
    except Exception as exc:  # any damage to a message someone sent us makes it unreadable
        return _ignored(f"unreadable message ({type(exc).__name__})")
    unsubscribe_token = _token_in(addressed, "unsubscribe")
    if unsubscribe_token is not None:
        return _mailto_unsubscribe(nl, unsubscribe_token)
    if str(report).lower() == "feedback-report":
        return _complaint(nl, message, raw)
    local = nl.config.bounces.local_part or "bounces"
    token = _token_in(addressed, local)
    failures = _failures(message)
    dsn = str(report).lower() == "delivery-status"
    if not (dsn or message.get("X-Failed-Recipients") or any(failures)) and _automatic_reply(message):
        return _ignored(f"an automatic reply ({_subject(message)})")
    if token is None and dsn:
        token = _token_in(raw.decode("latin-1"), local)  # the returned message's own Return-Path names it
    if token is None:
        return _ignored(f"not addressed to {local}+<token> or unsubscribe+<token> ({_subject(message)})")
    return _bounce(nl, token, *_diagnosis(message, failures))


def _failures(message: Message) -> tuple[frozenset[bytes], frozenset[bytes]]:
    """flufl.bounce's (temporary, permanent) failed addresses; none when a detector trips over the message."""
    try:
        return all_failures(message)
    except Exception as exc:  # a detector's bug must not stop the mail that follows
        log.info("bounce detectors could not read the message (%s)", type(exc).__name__)
        return frozenset(), frozenset()


def _token_in(text: str, local_part: str) -> str | None:
    named = re.search(rf"(?<![\w.+-]){re.escape(local_part)}\+({RETURN_TOKEN_TEXT})@", text, re.IGNORECASE)
    if named is None:
        return None
    return named.group(1)


def _claim(nl: Newsletter, token: str) -> ReturnClaim | None:
    try:
        return nl.tokens.read_return_token(token)
    except InvalidToken:
        return None


def _reader(session: Session, claim: ReturnClaim) -> tuple[Subscriber | None, Delivery | Digest | OutboxMessage | None]:
    row = cast("Delivery | Digest | OutboxMessage | None", session.get(LEDGERS[claim.kind], claim.row_id))
    reader_id = row.subscriber_id if row is not None else None
    return (session.get(Subscriber, reader_id) if reader_id is not None else None), row


def _mailto_unsubscribe(nl: Newsletter, token: str) -> Outcome:
    claim = _claim(nl, token)
    if claim is None:
        return _ignored(f"an email to unsubscribe+{token[:40]}: forged or damaged token, nothing changed")
    with nl.sessions.begin() as session:
        reader, _ = _reader(session, claim)
        if reader is None:
            return _ignored(f"an email to unsubscribe+{token}: that email's reader is no longer on the list")
        left = unsubscribe(reader, Requester.unsubscribe_email())
        return Outcome("unsubscribed", f"reader {reader.id}" + ("" if left else " (had already left)"))


def _complaint(nl: Newsletter, message: Message, raw: bytes) -> Outcome:
    feedback = _feedback_type(message)
    if feedback != "abuse":
        return _ignored(f"a feedback report of type {feedback or 'unknown'}, not abuse")
    text = raw.decode("latin-1")
    token = _token_in(text, nl.config.bounces.local_part or "bounces") or _token_in(text, "unsubscribe")
    claim = _claim(nl, token) if token else None
    with nl.sessions.begin() as session:
        if claim is not None:
            reader, _ = _reader(session, claim)
        else:
            reader_id = _reader_of_unsubscribe_link(nl, text)
            reader = session.get(Subscriber, reader_id) if reader_id is not None else None
        if reader is None:
            return _ignored("an abuse report about no email of ours that names a reader still on the list")
        unsubscribe(reader, Requester.spam_complaint())
        reader.complained_at = utcnow()
        return Outcome("complaint", f"reader {reader.id} reported an email as spam: unsubscribed, never mailed again")


def _feedback_type(message: Message) -> str:
    for part in message.walk():
        if part.get_content_type() == "message/feedback-report":
            payload = part.get_payload()
            blocks = payload if isinstance(payload, list) else [email.message_from_string(str(payload))]
            for block in blocks:
                if isinstance(block, Message) and block.get("Feedback-Type"):
                    return str(block["Feedback-Type"]).strip().lower()
    return ""


def _reader_of_unsubscribe_link(nl: Newsletter, text: str) -> int | None:
    link = re.search(re.escape(nl.config.base_url) + r"/unsubscribe/([A-Za-z0-9_.-]+)", text)
    if link is None:
        return None
    try:
        return nl.tokens.read_unsubscribe_token(link.group(1))
    except InvalidToken:
        return None


def _diagnosis(message: Message, failures: tuple[frozenset[bytes], frozenset[bytes]]) -> tuple[str, str]:
    """The enhanced status code of the failure ("" when none can be found) and the server's words for it;
    FAILURES are flufl.bounce's temporary and permanent ones, for bounces that are not RFC 3464 reports."""
    for part in message.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        payload = part.get_payload()
        for block in payload if isinstance(payload, list) else []:
            if not isinstance(block, Message):
                continue
            action = str(block.get("Action", "")).strip().lower()
            status = ENHANCED_STATUS.search(str(block.get("Status", "")))
            if status is None or action in ("delivered", "relayed", "expanded"):
                continue
            words = " ".join(str(block.get("Diagnostic-Code", "")).split()) or f"{action} {status.group(0)}"
            return ("4.0.0" if action == "delayed" else status.group(0)), words
    words = _first_text(message)
    found = ENHANCED_STATUS.search(words)
    if found is not None and found.group(1) != "2":
        return found.group(0), _around(words, found.start())
    temporary, permanent = failures
    if permanent:
        return "5.0.0", _around(words, 0)
    if temporary:
        return "4.0.0", _around(words, 0)
    return "", _around(words, 0)


def _first_text(message: Message) -> str:
    for part in message.walk():
        if part.get_content_type() == "text/plain":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                return payload.decode(part.get_content_charset() or "utf-8", "replace")
    return ""


def _around(text: str, at: int) -> str:
    return " ".join(text[max(0, at - 200) : at + 600].split())[:TEXT_KEPT]


def _bounce(nl: Newsletter, token: str, status: str, words: str) -> Outcome:
    claim = _claim(nl, token)
    if claim is None:
        return _ignored(f"a bounce to a forged or damaged token ({token[:40]}), nothing changed")
    now = utcnow()
    with nl.sessions.begin() as session:
        reader, row = _reader(session, claim)
        if row is None or reader is None:
            return _ignored(f"a bounce about an email whose reader is no longer on the list ({token})")
        if isinstance(row, OutboxMessage):
            row.error = words[:TEXT_KEPT] or None
        else:
            row.bounced_at, row.error = now, (words[:TEXT_KEPT] or status or "bounced")
        if status.startswith("5.7."):
            log.warning("a receiving server refused our email by its policy (%s): %s", status, words)
            return Outcome("policy bounce", f"reader {reader.id} kept: {status} is about the sender, not the reader")
        if status.startswith("5.") and status != "5.2.2":
            _mark_bounced(reader)
            return Outcome("bounced", f"reader {reader.id}: permanent failure {status}")
        points = _add_points(reader, now)
        if reader.bounce_score >= BOUNCED_SCORE:
            _mark_bounced(reader)
            return Outcome("bounced", f"reader {reader.id}: {reader.bounce_score:g} temporary failures in a row")
        kind = f"temporary failure {status}" if status else "an unparseable bounce"
        counted = f"score {reader.bounce_score:g} of {BOUNCED_SCORE:g}" if points else "already counted today"
        return Outcome("soft bounce", f"reader {reader.id}: {kind}, {counted}")


def _add_points(reader: Subscriber, now: datetime) -> bool:
    """Count one soft bounce, at most one a day; False when today's is already counted."""
    last = reader.last_bounce_at
    if last is not None and now - last > SCORE_WINDOW:
        reader.bounce_score = 0.0
    elif last is not None and last.date() == now.date():
        return False
    reader.bounce_score = (reader.bounce_score or 0.0) + SOFT_POINTS
    reader.last_bounce_at = now
    return True


def _mark_bounced(reader: Subscriber) -> None:
    reader.last_bounce_at = utcnow()
    if reader.status in (Status.CONFIRMED, Status.UNCONFIRMED):
        reader.status = Status.BOUNCED
        reader.confirm_nonce = None


def _automatic_reply(message: Message) -> bool:
    """RFC 3834's Auto-Submitted, the headers vacation programs set, or an out-of-office subject."""
    if str(message.get("Auto-Submitted", "no")).strip().lower() not in ("", "no"):
        return True
    if any(message.get(name) for name in ("X-Autoreply", "X-Autorespond", "X-Auto-Response-Suppress")):
        return True
    if str(message.get("Precedence", "")).strip().lower() in ("auto_reply", "bulk", "junk", "list"):
        return True
    return bool(AUTO_REPLY_SUBJECT.search(_subject(message)))


def _subject(message: Message) -> str:
    return " ".join(str(message.get("Subject", "")).split())[:120] or "no subject"


def _ignored(why: str) -> Outcome:
    log.info("inbound mail ignored: %s", why)
    return Outcome("ignored", why)
