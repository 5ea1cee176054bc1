"""Signed tokens for the links in emails: one salt per purpose, no address inside."""

from __future__ import annotations

import base64
import hmac
import re
import time
from dataclasses import dataclass

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner, URLSafeSerializer, URLSafeTimedSerializer
from itsdangerous.encoding import base64_encode

CONFIRM_SALT = "newsletter.confirm.v1"
UNSUBSCRIBE_SALT = "newsletter.unsubscribe.v1"
FORM_SALT = "newsletter.form.v1"
MANAGE_SALT = "newsletter.manage.v1"  # the manage link in every email: it works as long as the reader is listed
MANAGE_LINK_SALT = "newsletter.manage-link.v1"  # the one /manage emails on request: it expires
MANAGE_LINK_MAX_AGE = 24 * 3600
RETURN_SALT = b"newsletter.return.v1"  # the token in a bounce address and the mailto unsubscribe address
RETURN_KINDS = {"d": "delivery", "g": "digest", "o": "outbox"}  # which ledger the row of a token is in
RETURN_TOKEN_TEXT = r"[dgo][0-9]{1,18}-[a-z2-7]{16}"  # what return_token() makes; read_return_token() reads it
_RETURN_TOKEN = re.compile(r"([dgo])([0-9]{1,18})-([a-z2-7]{16})")


class InvalidToken(Exception):
    """The token is tampered, cut short, signed for another purpose, or unknown."""


class ExpiredToken(InvalidToken):
    pass


@dataclass(frozen=True)
class ConfirmClaim:
    subscriber_id: int
    nonce: str


@dataclass(frozen=True)
class ReturnClaim:
    kind: str  # a key of RETURN_KINDS
    row_id: int


class Tokens:
    def __init__(self, secret_keys: list[str], confirm_max_age_seconds: int) -> None:
        """secret_keys: oldest to newest; the newest signs, all verify."""
        self._return_keys = [hmac.digest(key.encode(), RETURN_SALT, "sha256") for key in reversed(secret_keys)]
        self._confirm = URLSafeTimedSerializer(secret_keys, salt=CONFIRM_SALT)
        self._unsubscribe = URLSafeSerializer(secret_keys, salt=UNSUBSCRIBE_SALT)
        self._unsubscribe_mac = _signing_mac(self._unsubscribe)
        self._form = TimestampSigner(secret_keys, salt=FORM_SALT)
        self._manage = URLSafeSerializer(secret_keys, salt=MANAGE_SALT)
        self._manage_mac = _signing_mac(self._manage)
        self._manage_link = URLSafeTimedSerializer(secret_keys, salt=MANAGE_LINK_SALT)
        self._max_age = confirm_max_age_seconds

    def confirm_token(self, subscriber_id: int, nonce: str) -> str:
        return self._confirm.dumps([subscriber_id, nonce])

    def read_confirm_token(self, token: str) -> ConfirmClaim:
        try:
            subscriber_id, nonce = self._confirm.loads(token, max_age=self._max_age)
        except SignatureExpired:
            raise ExpiredToken from None
        except (BadSignature, ValueError, TypeError):
            raise InvalidToken from None
        if not isinstance(subscriber_id, int) or not isinstance(nonce, str):
            raise InvalidToken
        return ConfirmClaim(subscriber_id, nonce)

    def form_stamp(self) -> str:
        """A signed timestamp for the subscribe form, to tell how long it took to fill in."""
        return self._form.sign("form").decode()

    def form_age(self, stamp: str) -> float | None:
        """Seconds since form_stamp() made STAMP, or None when STAMP is forged or damaged."""
        try:
            _, signed_at = self._form.unsign(stamp, return_timestamp=True)
        except (BadSignature, ValueError, TypeError):
            return None
        return time.time() - signed_at.timestamp()

    def unsubscribe_token(self, subscriber_id: int) -> str:
        """What URLSafeSerializer.dumps(subscriber_id) gives (an int's JSON is its digits, too short to
        compress), made with one HMAC and none of its per-call overhead: a send makes one per message."""
        return _signed_id(self._unsubscribe_mac, subscriber_id)

    def read_unsubscribe_token(self, token: str) -> int:
        return _subscriber_id(self._unsubscribe, token)

    def manage_token(self, subscriber_id: int) -> str:
        """The manage link's token in every email; made like unsubscribe_token."""
        return _signed_id(self._manage_mac, subscriber_id)

    def manage_link_token(self, subscriber_id: int) -> str:
        """The token of the manage link that /manage emails on request; it expires after a day."""
        return self._manage_link.dumps(int(subscriber_id))

    def read_manage_token(self, token: str) -> int:
        """The subscriber of either kind of manage token; ExpiredToken for a requested link over a day old."""
        try:
            return _subscriber_id(self._manage, token)
        except InvalidToken:
            return _subscriber_id(self._manage_link, token, max_age=MANAGE_LINK_MAX_AGE)

    def return_token(self, kind: str, row_id: int) -> str:
        """A short token naming one email (KIND, a key of RETURN_KINDS, and its row), for the local part of an
        address: lower-case letters, digits and a dash, since mail systems may change the case of a local part."""
        return f"{kind}{int(row_id)}-{self._return_signature(self._return_keys[0], f'{kind}{int(row_id)}')}"

    def read_return_token(self, token: str) -> ReturnClaim:
        named = _RETURN_TOKEN.fullmatch(token.lower())
        if named is None:
            raise InvalidToken
        kind, row_id, signature = named.groups()
        if not any(
            hmac.compare_digest(signature, self._return_signature(key, f"{kind}{row_id}")) for key in self._return_keys
        ):
            raise InvalidToken
        return ReturnClaim(kind, int(row_id))

    @staticmethod
    def _return_signature(key: bytes, payload: str) -> str:
        return base64.b32encode(hmac.digest(key, payload.encode(), "sha256")[:10]).decode().lower()


def _signing_mac(serializer: URLSafeSerializer) -> hmac.HMAC:
    """An HMAC keyed as SERIALIZER's newest signer keys its signatures, derived once."""
    signer = serializer.make_signer()
    return hmac.new(signer.derive_key(), digestmod=signer.digest_method)


def _signed_id(mac: hmac.HMAC, subscriber_id: int) -> str:
    """SUBSCRIBER_ID signed as itsdangerous's Signer.sign signs it, with a copy of the pre-keyed MAC."""
    value = base64_encode(str(int(subscriber_id)).encode())
    signature = mac.copy()
    signature.update(value)
    return (value + b"." + base64_encode(signature.digest())).decode()


def _subscriber_id(
    serializer: URLSafeSerializer | URLSafeTimedSerializer, token: str, max_age: int | None = None
) -> int:
    try:
        if isinstance(serializer, URLSafeTimedSerializer):
            subscriber_id = serializer.loads(token, max_age=max_age)
        else:
            subscriber_id = serializer.loads(token)
    except SignatureExpired:
        raise ExpiredToken from None
    except (BadSignature, ValueError, TypeError):
        raise InvalidToken from None
    if not isinstance(subscriber_id, int) or isinstance(subscriber_id, bool):
        raise InvalidToken
    return subscriber_id
