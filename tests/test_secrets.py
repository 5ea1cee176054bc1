"""The secret key: rotating it keeps old links working; `serve` will not run without one."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import requests

from newsletter.config import load_config
from newsletter.web.app import create_app

from .conftest import free_port, wait_for


def rotate(config_file: Path, new_key: str, fallbacks: list[str]) -> None:
    """Edit [security] as the owner would: a new secret_key, the old ones listed as fallbacks."""
    lines = [line for line in config_file.read_text().splitlines() if not line.startswith("secret_key")]
    at = lines.index("[security]") + 1
    listed = ", ".join(f'"{key}"' for key in fallbacks)
    lines[at:at] = [f'secret_key = "{new_key}"', f"secret_key_fallbacks = [{listed}]"]
    config_file.write_text("\n".join(lines) + "\n")


def test_links_signed_with_the_old_key_work_until_it_is_removed(site, smtp, config_file) -> None:
    site.subscribe("reader@example.com")
    site.deliver_outbox()
    unsubscribe = site.nl.unsubscribe_url(1)
    old_key = site.nl.config.security.secret_key

    rotate(config_file, "a-brand-new-secret-key-of-32-characters", [old_key])
    rotated = create_app(load_config(config_file)).test_client()
    path = unsubscribe.replace(site.nl.config.base_url, "")
    assert rotated.get(path).status_code == 200
    assert rotated.post(path, data={"List-Unsubscribe": "One-Click"}).status_code == 200

    rotate(config_file, "a-brand-new-secret-key-of-32-characters", [])
    retired = create_app(load_config(config_file)).test_client()
    assert retired.get(path).status_code == 400
    new_link = retired.application.extensions["newsletter"].unsubscribe_url(1)
    assert new_link != unsubscribe
    assert retired.get(new_link.replace(site.nl.config.base_url, "")).status_code == 200


def test_serve_refuses_to_start_without_a_secret_key(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "n.db"}"\n')
    result = subprocess.run(
        ["newsletter", "--config", str(config), "serve", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "[security] secret_key is empty" in result.stderr


def newsletter(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["newsletter", "--config", str(config), *args], capture_output=True, text=True, timeout=30)


def test_a_short_secret_key_is_refused_at_start(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[security]\nsecret_key = "hunter2hunter2"\n[database]\nurl = "sqlite:///{tmp_path / "n.db"}"\n')
    for command in (["serve", "--port", str(free_port())], ["send"], ["db", "upgrade"]):
        result = newsletter(config, *command)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.count("\n") == 1 and "secret_key is 14 characters" in result.stderr
        assert "at least 32" in result.stderr and "secrets.token_urlsafe(48)" in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://news:hunter2-pass@127.0.0.1:{port}/news",  # nobody listens there
        "mysql://news:hunter2-pass@127.0.0.1/news",  # not a database we support
        "postgresql+nosuchdriver://news:hunter2-pass@127.0.0.1/news",  # no such driver
    ],
)
def test_a_database_password_never_appears_in_a_message(tmp_path: Path, url: str) -> None:
    config = tmp_path / "config.toml"
    secret = "s3cret-" * 6
    config.write_text(f'[security]\nsecret_key = "{secret}"\n[database]\nurl = "{url.format(port=free_port())}"\n')
    result = newsletter(config, "db", "upgrade")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "hunter2" not in result.stderr and "news:***@127.0.0.1" in result.stderr


def test_a_malformed_sqlite_url_is_refused_in_one_line(tmp_path: Path) -> None:
    """SQLAlchemy's own message lists the URL forms over several lines; the command says the first."""
    config = tmp_path / "config.toml"
    config.write_text(f'[security]\nsecret_key = "{"s3cret-" * 6}"\n[database]\nurl = "sqlite://=//{tmp_path}/n.db"\n')
    result = newsletter(config, "db", "upgrade")
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert "cannot be used: Invalid SQLite URL" in result.stderr


def test_serve_warns_when_links_would_not_be_https(run, config_file: Path) -> None:
    config_file.write_text(config_file.read_text().replace("https://news.example.com", "http://news.example.com"))
    port = free_port()
    server = subprocess.Popen(
        ["newsletter", "--config", str(config_file), "serve", "--port", str(port), "--no-worker"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def up() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(up, timeout=20)
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=20)
    assert "warning: [site] base_url http://news.example.com is not https" in stderr
    assert "Traceback" not in stderr
