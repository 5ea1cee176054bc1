"""`newsletter init`: a first configuration and database from flags or answers, and a fresh install that
serves its pages; `newsletter demo`, the README's first command, from its banner to SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from email import message_from_bytes, policy
from itertools import pairwise
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from markupsafe import escape

from newsletter.cli import cli

from .conftest import free_port
from .test_drift import readme_blocks

ROOT = Path(__file__).resolve().parent.parent
FLAGS = [
    "--no-input",
    "--name",
    "Harbour Notes",
    "--base-url",
    "https://news.example.com",
    "--feed-url",
    "https://harbour-notes.example/feed/",
    "--from",
    "Harbour Notes <news@example.com>",
    "--smtp-security",
    "none",
]


def init(tmp_path: Path, *args: str, input: str | None = None, config: str | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        options = ["--config", config] if config else []
        return CliRunner(env=env).invoke(cli, [*options, "init", *args], input=input, prog_name="newsletter")
    finally:
        os.chdir(old)


def test_init_with_flags_writes_a_private_config_with_a_new_key_and_creates_the_database(tmp_path: Path) -> None:
    smtp_port = free_port()
    result = init(tmp_path, *FLAGS, "--smtp-host", "127.0.0.1", "--smtp-port", str(smtp_port))
    assert result.exit_code == 0, result.output
    config = tmp_path / "config.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    values = tomllib.loads(config.read_text())
    assert values["site"]["name"] == "Harbour Notes" and values["smtp"]["port"] == smtp_port
    assert len(values["security"]["secret_key"]) >= 32
    assert "# " in config.read_text()  # the example's comments stay to explain each key
    assert "database upgraded from (empty) to" in result.output
    assert "FIX   smtp: cannot connect" in result.output and "run `newsletter check` again" in result.output
    assert (tmp_path / "newsletter.db").is_file()

    before = config.read_bytes()
    again = init(tmp_path, *FLAGS)
    assert again.exit_code == 1 and "exists; init never replaces" in again.output
    assert config.read_bytes() == before
    other = tomllib.loads((tmp_path / "config.toml").read_text())["security"]["secret_key"]
    init(tmp_path, *FLAGS, config="second.toml")
    assert tomllib.loads((tmp_path / "second.toml").read_text())["security"]["secret_key"] != other


def test_init_asks_for_what_is_not_given(tmp_path: Path) -> None:
    answers = "\n".join(
        ["Gale Diary", "https://news.example.org", "https://gale.example/rss", "fr", "Gale <gale@example.org>"]
        + ["127.0.0.1", str(free_port()), "none", "", "", ""]
    )
    result = init(tmp_path, input=answers + "\n")
    assert result.exit_code == 0, result.output
    assert "Blog name [My Blog]:" in result.output and "SMTP password:" in result.output
    site = tomllib.loads((tmp_path / "config.toml").read_text())["site"]
    assert site["feed_url"] == "https://gale.example/rss" and site["language"] == "fr"


def test_bad_answers_write_nothing_and_say_what_to_fix(tmp_path: Path) -> None:
    missing = init(tmp_path, "--no-input", "--name", "X")
    assert missing.exit_code == 1 and "--feed-url is required with --no-input" in missing.output
    bad = init(tmp_path, *FLAGS[:-2], "--smtp-security", "none", "--base-url", "ftp://news.example.com")
    assert bad.exit_code == 2 and "base_url" in bad.output and "nothing was written" in bad.output
    assert "Traceback" not in bad.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    unknown = init(tmp_path, *FLAGS, "--language", "sw")
    assert unknown.exit_code == 2 and "[site] language: there is no catalog for 'sw'" in unknown.output


@pytest.mark.skipif(sys.platform != "linux", reason="a fresh virtual environment is built the Linux way")
def test_a_fresh_install_inits_and_serves_its_pages(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert pip.returncode == 0, pip.stderr[-2000:]
    home = tmp_path / "site"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    newsletter = str(venv / "bin" / "newsletter")
    flags = [*FLAGS, "--smtp-host", "127.0.0.1", "--smtp-port", str(free_port()), "--language", "fr"]
    made = subprocess.run([newsletter, "init", *flags], cwd=home, env=env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert "wrote config.toml" in made.stdout

    # What the Dockerfile runs, without a container engine (none runs here): its CMD, then its HEALTHCHECK.
    port = free_port()
    dockerfile = (ROOT / "Dockerfile").read_text()
    command = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE).group(1))  # type: ignore[union-attr]
    command = [part.replace("8000", str(port)).replace("0.0.0.0", "127.0.0.1") for part in command]
    health = re.search(r"^\s+CMD (python .*)$", dockerfile, re.MULTILINE).group(1).replace("8000", str(port))  # type: ignore[union-attr]
    env |= {"PATH": f"{venv / 'bin'}:{env['PATH']}", "NEWSLETTER_CONFIG": str(home / "config.toml")}
    server = subprocess.Popen(command, cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def healthy() -> bool:
        return subprocess.run(["sh", "-c", health], env=env, capture_output=True, timeout=30).returncode == 0

    try:
        deadline = time.monotonic() + 60
        while not healthy():
            assert time.monotonic() < deadline and server.poll() is None, "serve never answered /healthz"
            time.sleep(0.2)
        page = requests.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert page.status_code == 200 and "Recevoir les nouveaux articles par e-mail" in page.text  # catalogs ship
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    assert not healthy()


def test_the_demo_serves_its_pages_catches_the_confirmation_email_and_stops_on_sigterm(tmp_path: Path) -> None:
    """`newsletter demo` as the README's first command runs it: its banner is the README's, a reader signs up
    with the form, the confirmation email shows up on the demo page, in the terminal and in its folder, and
    SIGTERM stops it with status 0."""
    port, smtp_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    with (tmp_path / "stderr").open("wb") as errors:
        demo = subprocess.Popen(
            ["newsletter", "demo", "--port", str(port), "--smtp-port", str(smtp_port)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
    terminal = demo.stdout
    assert terminal is not None
    printed: list[str] = []
    reader = threading.Thread(target=lambda: printed.extend(iter(terminal.readline, "")), daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"

    def until(found: Callable[[], object], what: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not found():
            assert demo.poll() is None, f"the demo stopped ({demo.returncode}): {''.join(printed)}"
            assert time.monotonic() < deadline, f"no {what} in time: {''.join(printed)}"
            time.sleep(0.05)

    try:
        until(lambda: any("Send new posts:" in line for line in printed), "banner")
        banner = "".join(printed).rstrip("\n").split("\n")
        blocks = readme_blocks()
        [shown] = [after for block, after in pairwise(blocks) if block.lines[-1].endswith("newsletter demo")]
        assert banner == [line.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for line in shown.lines]

        page = requests.get(f"{base}/", timeout=5)
        opened = time.monotonic()
        assert page.status_code == 200
        form = re.search(r'<form method="post" action="/subscribe"[^>]*>(.*?)</form>', page.text, re.S)
        assert form is not None and 'name="email"' in form[1], page.text
        fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', form[1]))
        time.sleep(max(0.0, opened + 2.1 - time.monotonic()))  # [web] min_fill_seconds: a person takes that long
        answer = requests.post(
            f"{base}/subscribe", data={**fields, "email": "reader@example.com", "website": ""}, timeout=5
        )
        assert answer.status_code == 200 and "Check your inbox" in answer.text

        until(lambda: any("[mail catcher]   " in line and "/confirm/" in line for line in printed), "confirm link")
        caught = [line for line in printed if line.startswith("[mail catcher] to reader@example.com: ")]
        [subject] = [line.split(": ", 1)[1].strip() for line in caught]
        [link] = [line.split()[-1] for line in printed if "/confirm/" in line]
        assert link.startswith(f"{base}/confirm/")
        mailbox = requests.get(f"{base}/demo", timeout=5)
        assert mailbox.status_code == 200 and escape(subject) in mailbox.text and link in mailbox.text
        html_version = re.search(r'href="(/demo/mail/\w+\.html)"', mailbox.text)
        assert html_version is not None and link in requests.get(base + html_version[1], timeout=5).text
        [eml] = (tmp_path / "newsletter-demo" / "mail").glob("*.eml")
        kept = message_from_bytes(eml.read_bytes(), policy=policy.default)
        assert kept["Subject"] == subject and link in kept.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        confirm = requests.get(link, timeout=5)
        assert confirm.status_code == 200 and 'name="csrf_token"' in confirm.text
    finally:
        demo.send_signal(signal.SIGTERM)
        try:
            status = demo.wait(timeout=15)
        except subprocess.TimeoutExpired:
            demo.kill()
            raise
        reader.join(timeout=5)
    assert status == 0, "".join(printed)
    stderr = (tmp_path / "stderr").read_text()
    assert "Traceback" not in stderr and "Traceback" not in "".join(printed), stderr
