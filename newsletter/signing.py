"""Optional DKIM signing (RFC 6376) of the exact bytes that go over SMTP, with dkimpy.

Signing is on when `[dkim] selector` and `[dkim] private_key_file` are set; `[dkim] domain` defaults to
the domain of `[smtp] from`, so the signature aligns with From for DMARC. `load_signer` reads and checks
the key once per process (`Newsletter.signer`); each message then costs one RSA signature, done in pure
Python by dkimpy (several milliseconds for a 2048-bit key).

Messages are signed when they go out, not when they are rendered: the outbox keeps unsigned bytes, so
emails queued before DKIM was set up, or before a key change, go out signed with the current key.

The signature covers List-Unsubscribe and List-Unsubscribe-Post, which mailbox providers require before
they offer one-click unsubscribe (RFC 8058 section 4). From and both List-Unsubscribe fields are
oversigned (named once more than they occur), so nobody on the way can add a second one without
breaking the signature.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import Config, ConfigError
from .mailer import Envelope, Result, Transport

# Header fields signed when present, in the order they are listed in h=.
SIGNED_HEADERS = (
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "list-id",
    "mime-version",
    "content-type",
    "auto-submitted",
)
# Signed one extra time (RFC 6376 section 5.4.2), so that adding another instance breaks the signature.
OVERSIGNED_HEADERS = ("from", "list-unsubscribe", "list-unsubscribe-post")
MIN_KEY_BITS = 1024  # RFC 8301: verifiers must reject shorter RSA keys
_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*$"
)


@dataclass(frozen=True)
class Signer:
    """Adds a DKIM-Signature header to a message (CRLF line endings); call it with the message bytes."""

    selector: str
    domain: str
    key_bits: int
    public_key: bytes  # DER SubjectPublicKeyInfo, as published base64-encoded in the p= tag
    _key: bytes = field(repr=False)  # the PEM file's bytes, handed to dkimpy for each message
    _sign: Callable[..., bytes] = field(repr=False)  # dkim.sign

    def __call__(self, message: bytes) -> bytes:
        include = _headers_to_sign(message)
        signature = self._sign(
            message,
            self.selector.encode("ascii"),
            self.domain.encode("ascii"),
            self._key,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=include,
            linesep=b"\r\n",
        )
        return signature + message

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def dns_record(self) -> str:
        """The TXT record to publish at dns_name."""
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(self.public_key).decode("ascii")


class SigningTransport:
    """Signs every message on its way into another transport."""

    def __init__(self, inner: Transport, signer: Signer) -> None:
        self.inner, self.signer = inner, signer

    def send(self, envelopes: Sequence[Envelope]) -> list[Result]:
        return self.inner.send([replace(e, data=self.signer(e.data), wire_ready=False) for e in envelopes])

    def close(self) -> None:
        self.inner.close()


def dkim_enabled(config: Config) -> bool:
    return bool(config.dkim.selector or config.dkim.private_key_file)


def signing_domain(config: Config) -> str:
    """`[dkim] domain`, or the domain of `[smtp] from` when it is empty (ASCII, lower case)."""
    domain = (config.dkim.domain or config.from_address.domain).strip().rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        return domain


def load_signer(config: Config) -> Signer | None:
    """The signer for CONFIG, or None when DKIM is off; raises ConfigError (one line) when it cannot sign."""
    selector, key_file = config.dkim.selector.strip(), config.dkim.private_key_file.strip()
    where = config.source
    if not dkim_enabled(config):
        if config.dkim.domain:
            raise ConfigError(
                f"{where}: [dkim] domain is set but [dkim] selector and private_key_file are "
                "empty; set both to sign with DKIM, or remove [dkim] domain"
            )
        return None
    import dkim  # only when signing: dkimpy loads dnspython, which every command would pay for
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    if not selector:
        raise ConfigError(
            f"{where}: [dkim] selector is empty but [dkim] private_key_file is set; set the "
            "selector whose DNS record holds the public key, or remove private_key_file"
        )
    if not key_file:
        raise ConfigError(
            f"{where}: [dkim] private_key_file is empty but [dkim] selector is set; name the "
            "PEM file of the private key, or remove the selector"
        )
    if not _DNS_NAME.match(selector):
        raise ConfigError(f'{where}: [dkim] selector must be a DNS label like "news2026", not {selector!r}')
    domain = signing_domain(config)
    if not _DNS_NAME.match(domain) or "." not in domain:
        raise ConfigError(f'{where}: [dkim] domain must be a domain name like "example.com", not {domain!r}')
    path = Path(key_file)
    try:
        path = path.expanduser()
        pem = path.read_bytes().replace(b"\r\n", b"\n")
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"{where}: [dkim] private_key_file {str(path)!r}: cannot read it "
            f"({getattr(exc, 'strerror', None) or exc}); check the path and its permissions"
        ) from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"{where}: [dkim] private_key_file {str(path)!r} is not a usable unencrypted PEM "
            f"RSA private key ({reason}); create one with: openssl genrsa -out dkim.pem 2048"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < MIN_KEY_BITS:
        found = f"a {key.key_size}-bit RSA key" if isinstance(key, rsa.RSAPrivateKey) else "not an RSA key"
        raise ConfigError(
            f"{where}: [dkim] private_key_file {str(path)!r} holds {found}; receivers need RSA of "
            f"at least {MIN_KEY_BITS} bits; create one with: openssl genrsa -out dkim.pem 2048"
        )
    public_key = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Signer(
        selector=selector, domain=domain, key_bits=key.key_size, public_key=public_key, _key=pem, _sign=dkim.sign
    )


def _headers_to_sign(message: bytes) -> list[bytes]:
    """SIGNED_HEADERS that occur in MESSAGE's head, each as often as it occurs (+1 if oversigned)."""
    head = message.split(b"\r\n\r\n", 1)[0]
    counts: dict[bytes, int] = {}
    for line in head.split(b"\r\n"):
        if line[:1] not in (b" ", b"\t"):
            name = line.partition(b":")[0].strip().lower()
            counts[name] = counts.get(name, 0) + 1
    include: list[bytes] = []
    for header in SIGNED_HEADERS:
        count = counts.get(header.encode("ascii"), 0)
        if count:
            include += [header.encode("ascii")] * (count + (header in OVERSIGNED_HEADERS))
    return include
