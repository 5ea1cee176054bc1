"""`newsletter demo`: a throwaway install with a built-in mail catcher, for trying the whole flow."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope as SMTPEnvelope

SAMPLE_FEED = "sample-feed.xml"


class MailCatcher:
    """An SMTP server on loopback that keeps every message as a .eml file and announces it."""

    def __init__(self, folder: Path, port: int, announce: Callable[[str], None] | None = None) -> None:
        self.folder = folder
        self.announce = announce
        folder.mkdir(parents=True, exist_ok=True)
        self.controller = Controller(self, hostname="127.0.0.1", port=port)

    async def handle_DATA(self, server: object, session: object, envelope: SMTPEnvelope) -> str:
        data = envelope.original_content or b""
        number = len(list(self.folder.glob("*.eml"))) + 1
        (self.folder / f"{number:06d}.eml").write_bytes(data)
        if self.announce:
            message = message_from_bytes(data, policy=policy.default)
            self.announce(f"[mail catcher] to {', '.join(envelope.rcpt_tos)}: {message['Subject']}")
            body = message.get_body(("plain",))
            for line in (body.get_content() if body else "").splitlines():
                if "://" in line:
                    self.announce(f"[mail catcher]   {line.strip()}")
        return "250 Message accepted"

    def start(self) -> None:
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()


def caught(folder: Path) -> list[tuple[str, EmailMessage]]:
    """Caught messages, newest first, as (name, message)."""
    files = sorted(folder.glob("*.eml"), reverse=True)
    return [(f.stem, message_from_bytes(f.read_bytes(), policy=policy.default)) for f in files]


def write_demo_config(folder: Path, web_port: int, smtp_port: int) -> Path:
    """Create FOLDER with a config, a secret and a sample feed (kept if already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    feed = folder / SAMPLE_FEED
    if not feed.exists():
        shutil.copy(Path(__file__).with_name("demo_feed.xml"), feed)
    config = folder / "config.toml"
    secret_file = folder / "secret"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_urlsafe(48))
        secret_file.chmod(0o600)
    config.write_text(f"""# Written by `newsletter demo`; use with: newsletter --config {config} COMMAND
[site]
name = "Demo Blog"
base_url = "http://127.0.0.1:{web_port}"
feed_url = "{feed.resolve()}"

[security]
secret_key = "{secret_file.read_text().strip()}"

[database]
url = "sqlite:///{(folder / "newsletter.db").resolve()}"

[smtp]
host = "127.0.0.1"
port = {smtp_port}
security = "none"
from = "Demo Blog <news@demo-blog.example>"
""")
    return config
