"""Deliverability: offline SpamAssassin scores (SPAM-1, SPAM-2), the List-Unsubscribe header as received
(MSG-14), DKIM signatures that cover the one-click headers (MSG-13, BULK-4), and `newsletter check`.

Every message checked here was rendered by the app and captured by a real aiosmtpd server. The only
thing mocked is DNS: the DKIM public key is handed to dkimpy's verifier by a function.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from email import message_from_bytes, policy
from pathlib import Path

import dkim
import pytest
from click.testing import CliRunner, Result

from newsletter import db, dispatch, roster
from newsletter.checks import Check, is_free_mail, run_checks
from newsletter.cli import cli
from newsletter.config import ConfigError, load_config
from newsletter.runtime import Newsletter
from newsletter.signing import load_signer

from .conftest import free_port, publish, serving
from .test_couriers import Watching, post
from .test_interrupted_send import FORKED
from .test_messages import raw_headers

SELECTOR = "news2026"
FROM_DOMAIN = "harbour-notes.example"
TITLE = "Grüße vom Hafen: the north quay reopens after the frost"
SUMMARY = (
    "<p>The harbour master reopened the north quay on Tuesday morning, three days after the first hard "
    "frost of the year cracked two of its old granite slabs. The fishing boats that had moored at the "
    "ferry pier moved back by noon, and the fish market keeps its usual hours this week.</p>"
    "<p>Repairs to the south quay start in May. The council has published the timetable and the list "
    "of berths that stay closed while the work goes on; we will write about it when the first crane "
    "arrives.</p>"
    '<p><a href="https://harbour-notes.example/2025/04/quay-reopens/">Continue reading</a></p>'
)
MAX_SCORE = 1.0
IGNORED_RULES = {"NO_RECEIVED", "NO_RELAYS"}  # informational, -0.0: every unrelayed message has them
# SPAM-2: rules a generated newsletter trips when it gets something wrong (a trailing * matches a family).
DENYLIST = (
    "MISSING_DATE",
    "MISSING_MID",
    "MISSING_FROM",
    "MISSING_HEADERS",
    "INVALID_DATE",
    "DATE_IN_FUTURE_*",
    "MIME_HTML_ONLY",
    "MPART_ALT_DIFF*",
    "HTML_IMAGE_ONLY_*",
    "HTML_SHORT_LINK_IMG_*",
    "HTTPS_HTTP_MISMATCH",
    "SUBJ_ALL_CAPS",
    "SUBJECT_NEEDS_ENCODING",
    "MIME_QP_LONG_LINE",
    "HTML_MIME_NO_HTML_TAG",
    "TO_NO_BRKTS_HTML_ONLY",
    "MIME_BASE64_TEXT",
    "FREEMAIL_FROM",
    "FORGED_GMAIL_RCVD",
    "HTML_FONT_LOW_CONTRAST",
)
LIST_UNSUBSCRIBE = re.compile(rb"^<https://news\.example\.com/unsubscribe/[A-Za-z0-9._~%-]+>$")


# ---- helpers ----------------------------------------------------------------------------------------


def header_values(raw: bytes, name: str) -> list[bytes]:
    return [value for field, value in raw_headers(raw) if field.lower() == name.lower()]


def without_header(raw: bytes, name: str) -> bytes:
    head, body = raw.split(b"\r\n\r\n", 1)
    kept = [f"{field}:".encode("ascii") + value for field, value in raw_headers(raw) if field.lower() != name.lower()]
    assert len(kept) < len(head.split(b"\r\n")), name
    return b"\r\n".join(kept) + b"\r\n\r\n" + body


def html_only(raw: bytes) -> bytes:
    """The same message with its text/plain part dropped: a single text/html body."""
    msg = message_from_bytes(raw, policy=policy.default)
    html = msg.get_body(("html",))
    head = b"".join(
        f"{field}:".encode("ascii") + value + b"\r\n"
        for field, value in raw_headers(raw)
        if field.lower() != "content-type"
    )
    return (
        head
        + b'Content-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
        + html.get_payload(decode=False).encode("ascii")
    )


def notify(run: Callable[..., Result], feed: Path, title: str = TITLE, summary: str = SUMMARY) -> None:
    """Add a confirmed reader, publish one post to the blog's feed and run `newsletter send`."""
    assert run("posts", "fetch").exit_code == 0
    assert run("subscribers", "add", "reader@example.com", "--confirmed").exit_code == 0
    publish(feed, title, "quay-reopens", summary)
    result = run("send")
    assert result.exit_code == 0, result.output
    assert " 0 failed" in result.output, result.output


def sign_up(site, smtp, address: str = "ada@example.com") -> tuple[bytes, bytes]:
    """Subscribe over HTTP and confirm with the emailed link; returns the confirmation and welcome emails."""
    assert site.subscribe(address).status_code == 200
    site.deliver_outbox()
    [confirmation] = smtp.to(address)
    link = next(url for url in confirmation.links() if "/confirm/" in url)
    assert site.press(link).status_code == 200
    site.deliver_outbox()
    welcome = [m for m in smtp.to(address) if m is not confirmation]
    assert len(welcome) == 1, [m.message["Subject"] for m in smtp.to(address)]
    return confirmation.raw, welcome[0].raw


def variant(config_file: Path, replace: dict[str, object] | None = None, append: str = "") -> Path:
    """A copy of the test configuration with some `key = value` lines changed and TOML appended."""
    content = config_file.read_text(encoding="utf-8")
    for key, value in (replace or {}).items():
        content, count = re.subn(
            rf"^{key} = .*$",
            lambda _, key=key, value=value: f"{key} = {json.dumps(value)}",
            content,
            count=1,
            flags=re.M,
        )
        assert count == 1, key
    path = config_file.with_name("variant.toml")
    path.write_text(content + append, encoding="utf-8")
    return path


def dkim_section(key_file: Path, **more: str) -> str:
    keys = {"selector": SELECTOR, "private_key_file": str(key_file), **more}
    return "\n[dkim]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())


# ---- fixtures: DKIM on or off ------------------------------------------------------------------


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    """A new RSA 2048 key: (private key PEM, base64 DER SubjectPublicKeyInfo for the DNS record)."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("neither the cryptography package nor openssl is available to make a test key")
        path = tmp_path_factory.mktemp("dkim-key") / "key.pem"
        subprocess.run([openssl, "genrsa", "-out", str(path), "2048"], check=True, capture_output=True)
        public = subprocess.run(
            [openssl, "rsa", "-in", str(path), "-pubout", "-outform", "DER"], check=True, capture_output=True
        ).stdout
        return path.read_bytes(), base64.b64encode(public).decode("ascii")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(public).decode("ascii")


@pytest.fixture
def dkim_settings() -> dict[str, str] | None:
    """Extra [dkim] keys for the test's configuration, or None to leave DKIM off (tests parametrize this)."""
    return None


@pytest.fixture
def smtp_settings() -> str:
    """Extra [smtp] lines for the test's configuration (tests parametrize this)."""
    return ""


@pytest.fixture
def extra_config(
    request: pytest.FixtureRequest, dkim_settings: dict[str, str] | None, smtp_settings: str, tmp_path: Path
) -> str:
    """Overrides the conftest fixture: SMTP_SETTINGS, then a [dkim] section with a fresh key file when the
    test turns DKIM on."""
    if dkim_settings is None:
        return smtp_settings
    pem, _ = request.getfixturevalue("key_pair")
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(pem)
    return smtp_settings + dkim_section(key_file, **dkim_settings)


DKIM_ON = pytest.mark.parametrize("dkim_settings", [{}], ids=["dkim"])


# ---- SpamAssassin -----------------------------------------------------------------------------------

Scorer = Callable[[bytes], tuple[float, list[str]]]


@pytest.fixture
def spamassassin(tmp_path: Path) -> Scorer:
    """Score a message with SpamAssassin's local rules only: no DNS, no network, no Bayes, no user prefs."""
    binary = shutil.which("spamassassin")
    if binary is None:
        reason = "spamassassin is not installed (Debian: apt-get install spamassassin)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI is set: the deliverability checks must run in CI")
        pytest.skip(reason)
    home = tmp_path / "spamassassin-home"  # its per-user state goes here, not in the real home
    home.mkdir()

    def score(raw: bytes) -> tuple[float, list[str]]:
        result = subprocess.run(
            [binary, "-L", "-t", "-x", "--cf=use_bayes 0"],
            input=raw,
            capture_output=True,
            timeout=120,
            env={**os.environ, "HOME": str(home)},
        )
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        text = result.stdout.decode("utf-8", "replace")
        status = re.search(r"^X-Spam-Status:(.*(?:\r?\n[ \t].*)*)", text, re.M)
        assert status, text[:2000]
        value = re.sub(r"\r?\n[ \t]+", " ", status.group(1))
        found = re.search(r"\bscore=(-?[\d.]+)", value)
        tests = re.search(r"\btests=(.*?)(?:\s+autolearn=|\s+version=|$)", value)
        assert found and tests, value
        rules = [rule.strip() for rule in tests.group(1).split(",") if rule.strip() and rule.strip() != "none"]
        return float(found.group(1)), rules

    return score


def report(name: str, scored: tuple[float, list[str]]) -> str:
    score, rules = scored
    line = f"SpamAssassin {name}: score={score} tests={','.join(rules) or 'none'}"
    print(line)
    return line


def denied(rules: list[str]) -> list[str]:
    return [
        rule
        for rule in rules
        if any(rule == entry or (entry.endswith("*") and rule.startswith(entry[:-1])) for entry in DENYLIST)
    ]


def assert_scores_low(name: str, scored: tuple[float, list[str]]) -> None:
    line = report(name, scored)
    score, rules = scored
    assert score < MAX_SCORE, line
    assert not denied([r for r in rules if r not in IGNORED_RULES]), line


def assert_list_unsubscribe_plain(raw: bytes) -> None:
    """MSG-14: one List-Unsubscribe field, one plain <https://...> value, not encoded and not folded."""
    [value] = header_values(raw, "List-Unsubscribe")
    assert b"=?" not in value and b"\r\n" not in value, value
    assert LIST_UNSUBSCRIBE.match(value.strip()), value
    assert header_values(raw, "List-Unsubscribe-Post") == [b" List-Unsubscribe=One-Click"]


def test_confirmation_and_welcome_score_low_spam1(site, smtp, spamassassin) -> None:
    """SPAM-1: the confirmation and welcome emails, as received over SMTP, score below 1.0 offline."""
    confirmation, welcome = sign_up(site, smtp)
    assert_scores_low("confirmation", spamassassin(confirmation))
    assert_scores_low("welcome", spamassassin(welcome))


@pytest.mark.parametrize("dkim_settings", [None, {}], ids=["unsigned", "dkim"])
def test_notification_scores_low_and_keeps_list_unsubscribe_plain_spam1_msg14(
    dkim_settings, smtp, run, feed, spamassassin
) -> None:
    """SPAM-1: a notification with a non-ASCII title and a real summary scores below 1.0, signed or not;
    MSG-14: the bytes SpamAssassin saw carry List-Unsubscribe as one plain https URL in angle brackets."""
    notify(run, feed)
    [note] = smtp.to("reader@example.com")
    assert note.message["Subject"] == TITLE
    assert_list_unsubscribe_plain(note.raw)
    assert bool(header_values(note.raw, "DKIM-Signature")) == (dkim_settings is not None)
    assert_scores_low(f"notification ({'signed' if dkim_settings is not None else 'unsigned'})", spamassassin(note.raw))


@pytest.mark.parametrize("damage, rule", [("no Date", "MISSING_DATE"), ("HTML only", "MIME_HTML_ONLY")])
def test_harness_catches_a_broken_notification_spam2(
    damage,
    rule,
    smtp,
    run,
    feed,
    spamassassin,
) -> None:
    """SPAM-2 negative control: the same notification with its Date removed, or with only its HTML part,
    makes SpamAssassin fire the rule for it, so a passing score above means something."""
    notify(run, feed)
    [note] = smtp.to("reader@example.com")
    broken = without_header(note.raw, "Date") if damage == "no Date" else html_only(note.raw)
    scored = spamassassin(broken)
    line = report(f"notification, {damage}", scored)
    assert rule in scored[1], line


# ---- DKIM -------------------------------------------------------------------------------------------


class FakeDNS:
    """dkimpy's dnsfunc: the TXT record of <selector>._domainkey.<domain>, and nothing else."""

    def __init__(self, public_key: str, domain: str = FROM_DOMAIN) -> None:
        self.name = f"{SELECTOR}._domainkey.{domain}."
        self.record = f"v=DKIM1; k=rsa; p={public_key}".encode("ascii")
        self.asked: list[str] = []

    def __call__(self, name: bytes, timeout: int = 5) -> bytes | None:
        self.asked.append(name.decode("ascii"))
        return self.record if name.decode("ascii").lower() == self.name else None


def signature_tags(raw: bytes) -> dict[str, str]:
    [value] = header_values(raw, "DKIM-Signature")
    text = re.sub(r"\s+", "", value.decode("ascii"))
    return dict(tag.split("=", 1) for tag in text.strip(";").split(";"))


def signed_headers(raw: bytes) -> list[str]:
    return signature_tags(raw)["h"].lower().split(":")


@DKIM_ON
def test_notification_is_signed_over_the_one_click_headers_msg13_bulk4(
    dkim_settings, smtp, run, feed, key_pair
) -> None:
    """MSG-13: the notification as received verifies against the published key, with d= the From domain
    and h= covering From, Subject and both List-Unsubscribe fields; BULK-4: those are oversigned."""
    notify(run, feed)
    [note] = smtp.to("reader@example.com")
    dns = FakeDNS(key_pair[1])
    assert dkim.verify(note.raw, dnsfunc=dns)
    assert dns.asked == [dns.name]
    assert note.raw.startswith(b"DKIM-Signature: ")
    tags = signature_tags(note.raw)
    assert (tags["d"], tags["s"], tags["c"], tags["a"]) == (FROM_DOMAIN, SELECTOR, "relaxed/relaxed", "rsa-sha256")
    headers = signed_headers(note.raw)
    assert {
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
    } <= set(headers), headers
    for name in ("from", "list-unsubscribe", "list-unsubscribe-post"):
        assert headers.count(name) == 2, (name, headers)  # once more than present: none can be added


@DKIM_ON
def test_tampered_list_unsubscribe_fails_verification_msg13(
    dkim_settings,
    smtp,
    run,
    feed,
    key_pair,
) -> None:
    """A changed or an added List-Unsubscribe breaks the signature; a relay's Received line does not."""
    notify(run, feed)
    [note] = smtp.to("reader@example.com")
    dns = FakeDNS(key_pair[1])
    [value] = header_values(note.raw, "List-Unsubscribe")
    changed = note.raw.replace(
        b"List-Unsubscribe:" + value + b"\r\n",
        b"List-Unsubscribe:" + value.replace(b"news.example.com", b"news.example.net") + b"\r\n",
    )
    added = note.raw.replace(
        b"List-Unsubscribe:" + value + b"\r\n",
        b"List-Unsubscribe:" + value + b"\r\nList-Unsubscribe: <https://evil.example/u>\r\n",
    )
    relayed = b"Received: from relay.example by mx.example; Tue, 1 Apr 2025 10:00:01 +0000\r\n" + note.raw
    assert changed != note.raw and added != note.raw
    assert not dkim.verify(changed, dnsfunc=dns)
    assert not dkim.verify(added, dnsfunc=dns)
    assert dkim.verify(relayed, dnsfunc=dns)


@DKIM_ON
def test_confirmation_welcome_and_test_copy_are_signed(dkim_settings, site, smtp, run, feed, key_pair) -> None:
    """One-off emails are signed when the outbox delivers them, and so is `send --to`'s copy."""
    confirmation, welcome = sign_up(site, smtp)
    notify(run, feed)
    copy = run("send", "--to", "me@example.com")
    assert copy.exit_code == 0, copy.output
    [sent_copy] = smtp.to("me@example.com")
    dns = FakeDNS(key_pair[1])
    for raw in (confirmation, welcome, sent_copy.raw):
        assert dkim.verify(raw, dnsfunc=dns), raw[:600]
        headers = signed_headers(raw)
        assert {"from", "to", "subject", "date", "message-id", "mime-version", "content-type"} <= set(headers)
    assert "list-unsubscribe" not in signed_headers(confirmation)
    assert {"list-unsubscribe", "list-unsubscribe-post"} <= set(signed_headers(sent_copy.raw))


@DKIM_ON
@pytest.mark.parametrize("smtp_settings", [FORKED], ids=["child-processes"])
def test_child_processes_sign_every_email_they_write(dkim_settings, smtp_settings, nl, smtp_port, key_pair) -> None:
    """MSG-13 for a send large enough to be written by child processes (30 readers, 2 connections, batches
    of 10): every reader's email verifies."""
    readers = {f"reader{i:02d}@example.com" for i in range(30)}
    for address in readers:
        roster.add_subscriber(nl, address, confirmed=True)
    post(nl, "Quay reopens")
    with serving(Watching(), smtp_port) as sink, db.sender_lock(nl.engine) as sender_id:
        report = dispatch.send(nl, sender_id)
    assert (report.sent, report.failed) == (30, 0)
    assert all(len(running) == 2 for running in sink.writers)
    assert {recipient for message in sink.messages for recipient in message.recipients} == readers
    dns = FakeDNS(key_pair[1])
    assert all(dkim.verify(message.raw, dnsfunc=dns) for message in sink.messages)


@pytest.mark.parametrize("dkim_settings", [{"domain": f"mail.{FROM_DOMAIN}"}], ids=["dkim-domain"])
def test_dkim_domain_sets_d_and_the_key_lookup(dkim_settings, smtp, run, feed, key_pair) -> None:
    """[dkim] domain, when set, is the d= of the signature and the domain under which the key is looked up."""
    notify(run, feed)
    [note] = smtp.to("reader@example.com")
    dns = FakeDNS(key_pair[1], domain=f"mail.{FROM_DOMAIN}")
    assert dkim.verify(note.raw, dnsfunc=dns)
    assert signature_tags(note.raw)["d"] == f"mail.{FROM_DOMAIN}"


def test_load_signer_reads_pkcs1_and_pkcs8_keys(tmp_path: Path, config_file: Path, key_pair) -> None:
    """Both PEM forms openssl writes load (also with CRLF line ends), the public key derived from them is the
    generator's, and the signer signs."""
    pkcs8 = tmp_path / "pkcs8.pem"
    pkcs8.write_bytes(key_pair[0])
    crlf = tmp_path / "crlf.pem"
    crlf.write_bytes(key_pair[0].replace(b"\n", b"\r\n"))
    forms = [pkcs8, crlf]
    openssl = shutil.which("openssl")
    if openssl:
        pkcs1 = tmp_path / "pkcs1.pem"
        subprocess.run(
            [openssl, "rsa", "-in", str(pkcs8), "-out", str(pkcs1), "-traditional"], check=True, capture_output=True
        )
        assert pkcs1.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
        forms.append(pkcs1)
    for key_file in forms:
        signer = load_signer(load_config(variant(config_file, append=dkim_section(key_file))))
        assert signer is not None
        assert (signer.selector, signer.domain, signer.key_bits) == (SELECTOR, FROM_DOMAIN, 2048)
        assert signer.dns_record == f"v=DKIM1; k=rsa; p={key_pair[1]}"
        assert signer.dns_name == f"{SELECTOR}._domainkey.{FROM_DOMAIN}"
        message = b"From: <news@harbour-notes.example>\r\nSubject: hi\r\n\r\nhi\r\n"
        assert dkim.verify(signer(message), dnsfunc=FakeDNS(key_pair[1]))


def test_dkim_off_without_settings(config_file: Path) -> None:
    assert load_signer(load_config(config_file)) is None


def one_line_config_error(config: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_signer(load_config(config))
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize(
    "content",
    [
        None,
        b"",
        b"not a key\n",
        b"-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n-----END PUBLIC KEY-----\n",
    ],
    ids=["missing", "empty", "text", "public key"],
)
def test_unusable_key_file_is_one_config_error_line(content, tmp_path: Path, config_file: Path) -> None:
    """A key file that is missing or is not a private key names [dkim] private_key_file in one line."""
    key_file = tmp_path / "dkim.pem"
    if content is not None:
        key_file.write_bytes(content)
    message = one_line_config_error(variant(config_file, append=dkim_section(key_file)))
    assert "[dkim] private_key_file" in message and str(key_file) in message


def test_short_key_is_refused(tmp_path: Path, config_file: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not available to make a 512-bit key")
    key_file = tmp_path / "short.pem"
    subprocess.run([openssl, "genrsa", "-out", str(key_file), "512"], check=True, capture_output=True)
    message = one_line_config_error(variant(config_file, append=dkim_section(key_file)))
    assert "[dkim] private_key_file" in message and "512-bit" in message


def test_half_configured_dkim_is_a_config_error(tmp_path: Path, config_file: Path) -> None:
    only_key = '\n[dkim]\nprivate_key_file = "dkim.pem"\n'
    assert "[dkim] selector" in one_line_config_error(variant(config_file, append=only_key))
    only_selector = '\n[dkim]\nselector = "news2026"\n'
    assert "[dkim] private_key_file" in one_line_config_error(variant(config_file, append=only_selector))


def test_missing_key_file_stops_the_command_with_exit_2(app, config_file: Path, tmp_path: Path) -> None:
    """The commands check the key at start-up: exit status 2 and one line naming the key, nothing sent."""
    missing = tmp_path / "no-such-dkim.pem"
    config = variant(config_file, append=dkim_section(missing))
    result = CliRunner().invoke(cli, ["--config", str(config), "send", "--no-fetch"], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    assert "[dkim] private_key_file" in line and str(missing) in line


# ---- newsletter check -------------------------------------------------------------------------------


def by_name(checks: list[Check]) -> dict[str, Check]:
    names = [check.name for check in checks]
    assert len(names) == len(set(names)), names
    return {check.name: check for check in checks}


def test_checks_pass_on_a_good_configuration(app, smtp) -> None:
    """https links, a From on the blog's domain and a reachable SMTP relay are ok; DKIM off is information,
    and the sample notification shows the one-click headers."""
    listed = run_checks(app.extensions["newsletter"])
    assert [c.name for c in listed] == [
        "base_url",
        "from",
        "smtp",
        "dkim",
        "form origins",
        "accent_color",
        "sample headers",
    ]
    checks = by_name(listed)
    for name in ("base_url", "from", "smtp"):
        assert checks[name].ok is True, checks[name]
    assert checks["dkim"].ok is None and checks["dkim"].detail.startswith("off")
    sample = checks["sample headers"]
    assert sample.ok is None
    assert "\nList-Unsubscribe: <https://news.example.com/unsubscribe/" in sample.detail
    assert "\nList-Unsubscribe-Post: List-Unsubscribe=One-Click" in sample.detail
    assert "DKIM-Signature" not in sample.detail
    assert smtp.messages == []  # the SMTP check sends nothing


@DKIM_ON
def test_checks_describe_dkim_and_show_a_signed_sample(dkim_settings, app, smtp, key_pair) -> None:
    checks = by_name(run_checks(app.extensions["newsletter"]))
    assert all(check.ok is not False for check in checks.values()), checks
    dkim_line = checks["dkim"]
    assert dkim_line.ok is True
    for part in (SELECTOR, FROM_DOMAIN, "2048-bit", f"{SELECTOR}._domainkey.{FROM_DOMAIN}", key_pair[1]):
        assert part in dkim_line.detail, part
    head = checks["sample headers"].detail
    assert "\nDKIM-Signature: " in head and "list-unsubscribe-post" in head


def test_checks_name_each_problem(config_file: Path, tmp_path: Path) -> None:
    """http links, a gmail.com From and an SMTP port nobody listens on each give a failed check saying so."""
    port = free_port()
    config = load_config(
        variant(
            config_file,
            {"base_url": "http://news.example.com", "from": "Harbour Notes <harbour.notes@gmail.com>", "port": port},
        )
    )
    nl = Newsletter(config)
    try:
        checks = by_name(run_checks(nl))
    finally:
        nl.engine.dispose()
    assert checks["base_url"].ok is False and "https" in checks["base_url"].detail
    assert checks["from"].ok is False and "gmail.com" in checks["from"].detail
    assert checks["smtp"].ok is False
    assert "cannot connect" in checks["smtp"].detail and f"127.0.0.1:{port}" in checks["smtp"].detail
    assert "sample headers" in checks


def test_check_reports_a_relay_without_starttls(config_file: Path, smtp) -> None:
    """security = starttls against a server that does not offer it: the mailer's one line, as a failure."""
    nl = Newsletter(load_config(variant(config_file, {"security": "starttls"})))
    try:
        smtp_check = by_name(run_checks(nl))["smtp"]
    finally:
        nl.engine.dispose()
    assert smtp_check.ok is False and "STARTTLS" in smtp_check.detail


def test_check_flags_a_dkim_domain_that_does_not_align_with_from(config_file: Path, tmp_path: Path, key_pair) -> None:
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(key_pair[0])
    config = variant(config_file, append=dkim_section(key_file, domain="other-blog.example"))
    nl = Newsletter(load_config(config))
    try:
        checks = by_name(run_checks(nl))
    finally:
        nl.engine.dispose()
    assert checks["dkim"].ok is True
    assert checks["from"].ok is False and "other-blog.example" in checks["from"].detail


def test_check_reports_an_unusable_key(config_file: Path, tmp_path: Path) -> None:
    missing = tmp_path / "gone.pem"
    nl = Newsletter(load_config(variant(config_file, append=dkim_section(missing))))
    try:
        dkim_check = by_name(run_checks(nl))["dkim"]
    finally:
        nl.engine.dispose()
    assert dkim_check.ok is False and "[dkim] private_key_file" in dkim_check.detail


@pytest.mark.parametrize(
    "domain, free",
    [
        ("gmail.com", True),
        ("googlemail.com", True),
        ("yahoo.com", True),
        ("yahoo.co.uk", True),
        ("outlook.com", True),
        ("hotmail.fr", True),
        ("icloud.com", True),
        ("aol.com", True),
        ("gmx.de", True),
        ("gmx.net", True),
        ("proton.me", True),
        ("protonmail.com", True),
        ("yandex.ru", True),
        ("yandex.com.tr", True),
        ("mail.ru", True),
        ("GMAIL.COM.", True),
        (FROM_DOMAIN, False),
        ("outlook.harbour-notes.example", False),
        ("gmxample.com", False),
        ("mail.example.org", False),
        ("yahoo-fans.example", False),
    ],
)
def test_free_mail_domains(domain: str, free: bool) -> None:
    assert is_free_mail(domain) is free


@pytest.mark.parametrize("extra_config", ['[digest]\ndefault_frequency = "daily"\nsend_hour = 0\n'])
def test_a_digest_scores_low_and_keeps_list_unsubscribe_plain_spam1_msg14(smtp, run, feed, spamassassin) -> None:
    """SPAM-1 and MSG-14 for the daily digest of two posts, one with a non-ASCII title."""
    assert run("posts", "fetch").exit_code == 0
    assert run("subscribers", "add", "reader@example.com", "--confirmed").exit_code == 0
    publish(feed, TITLE, "quay-reopens", SUMMARY)
    publish(feed, "Storm warning for the outer harbour", "storm-warning", SUMMARY)
    result = run("send")
    assert result.exit_code == 0 and "2 post(s), 1 digest(s): 1 sent" in result.output, result.output
    [digest] = smtp.to("reader@example.com")
    assert digest.message["Subject"].startswith("Daily digest from Harbour Notes: ")
    assert digest.message["Subject"].endswith(" and 1 more") and TITLE in digest.text
    assert_list_unsubscribe_plain(digest.raw)
    assert_scores_low("daily digest", spamassassin(digest.raw))
