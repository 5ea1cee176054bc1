"""`newsletter init`: a first configuration and database from flags or answers, and a fresh install that
serves its pages."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from newsletter.cli import cli

from .conftest import free_port

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
