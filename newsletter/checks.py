"""`newsletter check`: what a site owner would otherwise learn from bounces and spam folders.

Each check is one line: ok (True), a problem to fix (False), or information (None), which is a warning
when `warn` is set: worth acting on, though the mail goes out. Nothing here changes any state; the SMTP
check opens one session and closes it without sending.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from .config import MIN_LINK_CONTRAST, Config, ConfigError, contrast_ratio, origin_of
from .mailer import MailerError
from .messages import notification_template
from .runtime import Newsletter
from .signing import Signer, load_signer, signing_domain

# Mailbox providers whose domains publish DMARC policies that make mail "from" them sent by anyone else
# fail (or that receivers treat as forged when it does not come from the provider's own servers).
FREE_MAIL_DOMAINS = frozenset(
    {
        "gmail.com",
        "googlemail.com",
        "yahoo.com",
        "ymail.com",
        "rocketmail.com",
        "outlook.com",
        "hotmail.com",
        "live.com",
        "msn.com",
        "icloud.com",
        "me.com",
        "mac.com",
        "aol.com",
        "proton.me",
        "protonmail.com",
        "protonmail.ch",
        "pm.me",
        "mail.ru",
        "inbox.ru",
        "list.ru",
        "bk.ru",
        "zoho.com",
        "mail.com",
        "web.de",
        "t-online.de",
        "freenet.de",
        "libero.it",
        "orange.fr",
        "laposte.net",
        "free.fr",
        "qq.com",
        "163.com",
        "126.com",
        "naver.com",
        "tutanota.com",
        "tuta.io",
        "fastmail.com",
    }
)
# Providers with a domain per country: gmx.de, gmx.net, yahoo.co.uk, hotmail.fr, yandex.ru, ...
FREE_MAIL_BRANDS = frozenset({"gmx", "yandex", "yahoo", "hotmail", "outlook", "live", "aol", "gmail"})


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # True: fine, False: fix this, None: information
    detail: str
    warn: bool = False  # information that asks for a change: printed as "warn", the exit status stays 0


@dataclass(frozen=True)
class SamplePost:
    title: str
    url: str
    summary_html: str
    id: int = 0


def run_checks(nl: Newsletter) -> list[Check]:
    """All checks for the installation's configuration, in the order they are printed."""
    config = nl.config
    checks = [check_base_url(config)]
    signer, dkim_check = check_dkim(config)
    checks.append(check_from(config, signer))
    checks.append(check_smtp(nl))
    checks.append(dkim_check)
    checks.append(check_form_origins(config))
    checks.append(check_accent(config))
    checks.append(sample_headers(nl, signer))
    return checks


def check_base_url(config: Config) -> Check:
    url = urlsplit(config.base_url)
    host = url.hostname or ""
    if url.scheme != "https":
        return Check(
            "base_url",
            False,
            f"[site] base_url {config.base_url} is not https: confirmation and "
            "unsubscribe links would travel in plaintext, and mail clients only offer one-click "
            "unsubscribe for https links (RFC 8058); serve the site over https and set base_url to it",
        )
    if _is_local(host):
        return Check(
            "base_url",
            False,
            f"[site] base_url {config.base_url} points at this machine: readers "
            "cannot open its links; set it to the site's public address",
        )
    return Check("base_url", True, f"links in emails start with {config.base_url}")


FEED_HOST_NAMES = ("feedburner", "feedpress", "feedblitz")


def check_form_origins(config: Config) -> Check:
    """Where the subscribe form is accepted from; a warning when the blog's own site is not known or is a guess
    that names a feed service."""
    base = origin_of(config.base_url)
    accepted = "accepted from " + ", ".join([base, *sorted(config.form_origins - {base})])
    site = config.site
    if not site.blog:
        return Check(
            "form origins",
            None,
            f"{accepted}; the blog's own site is not among them, so the form embedded on the blog is refused "
            "(unless [web] embed_origins lists it) and pages have no link back to the blog\n"
            'set [site] blog_url to the blog\'s address, e.g. blog_url = "https://blog.example.com/"',
            warn=True,
        )
    feed_host = urlsplit(site.feed_url).hostname or ""
    if not site.blog_url and (feed_host.startswith("feeds.") or any(n in feed_host for n in FEED_HOST_NAMES)):
        return Check(
            "form origins",
            None,
            f"{accepted}; the blog's site, {origin_of(site.blog)}, is guessed from [site] feed_url, and "
            f"{feed_host} looks like a feed service rather than the blog\n"
            "set [site] blog_url to the blog's address, so the form embedded on the blog is accepted and "
            "pages link back to it",
            warn=True,
        )
    source = "[site] blog_url" if site.blog_url else "the site of [site] feed_url"
    return Check("form origins", True, f"{accepted} (the blog: {origin_of(site.blog)}, {source})")


def check_accent(config: Config) -> Check:
    color = config.site.accent_color
    ratio = contrast_ratio(color)
    if ratio < MIN_LINK_CONTRAST:
        return Check(
            "accent_color",
            None,
            f"{color} has a contrast of {ratio:.1f}:1 against white (under 3:1): links in it would be hard to "
            "read, so pages and emails show links in the text colour and only buttons take the accent; choose a darker "
            "[site] accent_color to colour links too",
            warn=True,
        )
    return Check("accent_color", True, f"{color} for buttons and links, a contrast of {ratio:.1f}:1 against white")


def is_free_mail(domain: str) -> bool:
    """Whether DOMAIN belongs to a free mailbox provider (gmail.com, gmx.de, yahoo.co.uk, ...)."""
    labels = domain.lower().rstrip(".").split(".")
    if any(".".join(labels[i:]) in FREE_MAIL_DOMAINS for i in range(len(labels))):
        return True
    # BRAND.TLD or BRAND.SECOND.TLD with a short country part, e.g. gmx.net, yahoo.co.uk, yandex.com.tr
    return labels[0] in FREE_MAIL_BRANDS and 2 <= len(labels) <= 3 and all(len(label) <= 3 for label in labels[1:])


def aligned(from_domain: str, dkim_domain: str) -> bool:
    """Relaxed DMARC alignment, approximated: the same domain, or one is a subdomain of the other."""
    a, b = from_domain.lower().rstrip("."), dkim_domain.lower().rstrip(".")
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def check_from(config: Config, signer: Signer | None) -> Check:
    address = config.from_address
    domain = address.domain.lower()
    if is_free_mail(domain):
        return Check(
            "from",
            False,
            f"[smtp] from {address.addr_spec} is on the free-mail domain {domain}: "
            "its DMARC policy makes receivers reject or spam-folder mail sent from other servers "
            "(Gmail: 5.7.26); use an address on your blog's own domain",
        )
    if signer is not None and not aligned(domain, signer.domain):
        return Check(
            "from",
            False,
            f"[smtp] from domain {domain} differs from the DKIM domain {signer.domain}: "
            "the signature does not align with From, so DMARC fails unless SPF aligns; set "
            f"[dkim] domain to {domain} (or leave it empty)",
        )
    return Check("from", True, f"emails come from {address.addr_spec}")


def check_smtp(nl: Newsletter) -> Check:
    smtp = nl.config.smtp
    where = f"{smtp.host}:{smtp.port}"
    connection = nl.smtp_connection()
    try:
        connection.open()
    except MailerError as exc:
        return Check("smtp", False, str(exc))
    finally:
        connection.close()
    login = f", logged in as {smtp.username}" if smtp.username else ""
    if smtp.security == "none":
        if not _is_local(smtp.host):
            return Check(
                "smtp",
                False,
                f'{where} answered{login}, but [smtp] security = "none" sends '
                'messages (and any password) in plaintext over the network; use "starttls" '
                '(port 587) or "tls" (port 465)',
            )
        return Check("smtp", True, f"{where} answered{login} (no TLS: a relay on this machine)")
    return Check("smtp", True, f"{where} answered, TLS ({smtp.security}) with a verified certificate{login}")


def check_dkim(config: Config) -> tuple[Signer | None, Check]:
    """The signer (None when off or broken) and the line describing it."""
    try:
        signer = load_signer(config)
    except ConfigError as exc:
        return None, Check("dkim", False, str(exc))
    if signer is None:
        return None, Check(
            "dkim",
            None,
            "off: the SMTP relay must sign with DKIM for the From domain "
            f"{signing_domain(config)}, including List-Unsubscribe-Post in h= (set [dkim] "
            "selector and private_key_file to sign here instead)",
        )
    import dkim

    sample = signer(b"From: <check@" + signer.domain.encode("ascii") + b">\r\nSubject: check\r\n\r\ncheck\r\n")
    if not dkim.verify(sample, dnsfunc=lambda name, timeout=5: signer.dns_record.encode("ascii")):
        return None, Check(
            "dkim",
            False,
            "a test signature does not verify against the key's own public key; check [dkim] private_key_file",
        )
    detail = (
        f"on: selector {signer.selector}, domain {signer.domain}, {signer.key_bits}-bit RSA key; "
        f'publish TXT {signer.dns_name} "{signer.dns_record}"'
    )
    if signer.key_bits < 2048:
        return signer, Check(
            "dkim", False, detail.replace("RSA key;", "RSA key (use 2048 bits: openssl genrsa -out dkim.pem 2048);", 1)
        )
    return signer, Check("dkim", True, detail)


def sample_headers(nl: Newsletter, signer: Signer | None) -> Check:
    """The header block of a notification as a reader would receive it."""
    post = SamplePost(
        title="A sample post \u2013 what readers see",
        url=f"{nl.config.base_url}/sample-post/",
        summary_html="<p>The first lines of the post, as the feed gives them.</p>",
    )
    template = notification_template(nl.config, nl.render, post)
    message = template.render("reader@example.com", template.new_message_id(), nl.unsubscribe_url(0))
    if signer is not None:
        message = signer(message)
    head = message.split(b"\r\n\r\n", 1)[0].decode("ascii").replace("\r\n", "\n")
    state = "signed with DKIM" if signer is not None else "not signed"
    return Check("sample headers", None, f"a notification's headers ({state}):\n{head}")


def _is_local(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith((".localhost", ".local")):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
