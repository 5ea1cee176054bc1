"""Configuration mistakes as a site owner meets them: a real `newsletter` process, exit status 2, one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from newsletter.config import load_config
from newsletter.tokens import InvalidToken, Tokens

from .conftest import free_port

ROOT = Path(__file__).parents[1]
FEEDS = Path(__file__).parent / "feeds"


def newsletter(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """The installed `newsletter` command, with no NEWSLETTER_* settings leaking in from this shell."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    environ.update(env or {})
    return subprocess.run(["newsletter", *args], capture_output=True, text=True, env=environ, cwd=cwd, timeout=60)


def config_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a configuration error leaves on stderr."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def settings(
    tmp_path: Path,
    smtp_port: int | None = None,
    database: Path | None = None,
    secret: str | None = "s3cret-for-tests-of-at-least-32-chars",
) -> str:
    """A valid configuration file's text for this test's folder."""
    secret_line = f'secret_key = "{secret}"' if secret is not None else ""
    return f"""
[site]
name = "Harbour Notes"
base_url = "https://news.example.com"
feed_url = "{FEEDS / "wordpress-rss2.xml"}"

[security]
{secret_line}

[database]
url = "sqlite:///{database or tmp_path / "newsletter.db"}"

[smtp]
host = "127.0.0.1"
port = {smtp_port or free_port()}
security = "none"
from = "Harbour Notes <news@harbour-notes.example>"
timeout = 5
"""


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def upgraded(config: Path) -> Path:
    result = newsletter("--config", str(config), "db", "upgrade")
    assert result.returncode == 0, result.stderr
    return config


# ---- one line, exit status 2, for each mistake ----------------------------------------------------


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    text = settings(tmp_path).replace("[smtp]", "[smtp")
    config = write(tmp_path, text)
    line = config_error(newsletter("--config", str(config), "send"))
    assert str(config) in line and "TOML" in line
    assert f"line {text.splitlines().index('[smtp') + 1}" in line


@pytest.mark.parametrize("secret", [None, ""], ids=["missing", "empty"])
def test_secret_key_must_be_set(tmp_path: Path, secret: str | None) -> None:
    config = write(tmp_path, settings(tmp_path, secret=secret))
    line = config_error(newsletter("--config", str(config), "send"))
    assert "[security] secret_key" in line and "token_urlsafe" in line


def test_misspelt_key_is_named_with_the_keys_that_exist(tmp_path: Path) -> None:
    config = write(tmp_path, settings(tmp_path) + 'hots = "mail.example.com"\n')
    line = config_error(newsletter("--config", str(config), "send"))
    assert "[smtp] hots" in line and "host" in line.split("hots", 1)[1]


def test_unknown_section_is_named_with_the_sections_that_exist(tmp_path: Path) -> None:
    config = write(tmp_path, settings(tmp_path) + '\n[mailer]\nhost = "mail.example.com"\n')
    line = config_error(newsletter("--config", str(config), "send"))
    assert "[mailer]" in line and "[smtp]" in line


def test_smtp_security_must_be_a_known_mode(tmp_path: Path) -> None:
    config = write(tmp_path, settings(tmp_path).replace('security = "none"', 'security = "ssl"'))
    line = config_error(newsletter("--config", str(config), "send"))
    assert "[smtp] security" in line and "'ssl'" in line and "starttls" in line and "tls" in line


def test_smtp_port_must_be_a_number(tmp_path: Path) -> None:
    text = settings(tmp_path, smtp_port=2525).replace("port = 2525", 'port = "abc"')
    line = config_error(newsletter("--config", str(write(tmp_path, text)), "send"))
    assert "[smtp] port" in line and "'abc'" in line and "whole number" in line


@pytest.mark.parametrize(
    "setting, says",
    [
        ("send_hour = 24", "[digest] send_hour must be an hour from 0 to 23, not 24"),
        ("send_hour = -1", "[digest] send_hour must be a whole number of 0 or more, not -1"),
        (
            'weekday = "mon"',
            "[digest] weekday must be one of monday, tuesday, wednesday, thursday, friday, saturday, sunday, not 'mon'",
        ),
        (
            'timezone = "Mars/Olympus"',
            "[digest] timezone must be an IANA time zone name such as Europe/Paris or UTC, not 'Mars/Olympus'",
        ),
        (
            'default_frequency = "hourly"',
            "[digest] default_frequency must be one of instant, daily, weekly, not 'hourly'",
        ),
    ],
    ids=["send_hour-24", "send_hour-negative", "weekday", "timezone", "default_frequency"],
)
def test_a_bad_digest_setting_says_what_it_must_be(tmp_path: Path, setting: str, says: str) -> None:
    config = write(tmp_path, settings(tmp_path) + f"\n[digest]\n{setting}\n")
    assert config_error(newsletter("--config", str(config), "send")) == f"Error: {config}: {says}"


def test_a_weekday_may_be_written_with_a_capital(tmp_path: Path) -> None:
    config = write(tmp_path, settings(tmp_path) + '\n[digest]\nweekday = "Sunday"\n')
    assert load_config(config, environ={}).digest.weekday == "sunday"


def test_config_file_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "config.toml"
    line = config_error(newsletter("--config", str(missing), "send"))
    assert str(missing) in line and "no such configuration file" in line


def test_database_that_cannot_be_reached(tmp_path: Path) -> None:
    text = settings(tmp_path).replace(f"sqlite:///{tmp_path / 'newsletter.db'}", "postgresql+psycopg://u@127.0.0.1:1/x")
    line = config_error(newsletter("--config", str(write(tmp_path, text)), "send"))
    assert "postgresql+psycopg://u@127.0.0.1:1/x" in line and "[database] url" in line


def test_database_without_the_schema_says_to_upgrade(tmp_path: Path) -> None:
    database = tmp_path / "fresh.db"
    database.touch()
    config = write(tmp_path, settings(tmp_path, database=database))
    line = config_error(newsletter("--config", str(config), "send"))
    assert "newsletter db upgrade" in line

    upgraded(config)
    assert newsletter("--config", str(config), "send", "--no-fetch").returncode == 0


def test_help_needs_no_working_configuration(tmp_path: Path) -> None:
    broken = write(tmp_path, "[security\n")
    result = newsletter("--config", str(broken), "send", "--help")
    assert result.returncode == 0 and "Example" in result.stdout and result.stderr == ""


# ---- where the settings come from -----------------------------------------------------------------


def test_environment_names_the_database(tmp_path: Path) -> None:
    in_file, from_env = tmp_path / "file.db", tmp_path / "from-env.db"
    config = write(tmp_path, settings(tmp_path, database=in_file))
    result = newsletter(
        "--config", str(config), "db", "upgrade", env={"NEWSLETTER_DATABASE__URL": f"sqlite:///{from_env}"}
    )
    assert result.returncode == 0, result.stderr
    assert not in_file.exists()
    engine = create_engine(f"sqlite:///{from_env}")
    assert {"subscribers", "posts", "deliveries", "outbox"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_environment_names_the_smtp_port(tmp_path: Path, smtp, smtp_port: int) -> None:
    config = upgraded(write(tmp_path, settings(tmp_path)))  # the file names a port where nothing listens
    assert (
        newsletter(
            "--config",
            str(config),
            "posts",
            "add",
            "--title",
            "Ice on the quay",
            "--url",
            "https://harbour-notes.example/ice/",
        ).returncode
        == 0
    )

    unreachable = newsletter("--config", str(config), "send", "--to", "me@example.com")
    assert unreachable.returncode == 1 and "Connection refused" in unreachable.stderr
    assert smtp.messages == []

    result = newsletter(
        "--config", str(config), "send", "--to", "me@example.com", env={"NEWSLETTER_SMTP__PORT": str(smtp_port)}
    )
    assert result.returncode == 0, result.stderr
    assert smtp.subjects("me@example.com") == ["Ice on the quay"]


def test_environment_supplies_the_secret_key(tmp_path: Path, smtp, smtp_port: int) -> None:
    config = write(tmp_path, settings(tmp_path, smtp_port=smtp_port, secret=None))
    assert "secret_key" in config_error(newsletter("--config", str(config), "db", "upgrade"))

    secret = f"from-the-environment-{uuid.uuid4().hex}"
    env = {"NEWSLETTER_SECURITY__SECRET_KEY": secret}
    for command in (
        ["db", "upgrade"],
        ["posts", "add", "--title", "Spring tides", "--url", "https://harbour-notes.example/tides/"],
        ["send", "--to", "me@example.com"],
    ):
        result = newsletter("--config", str(config), *command, env=env)
        assert result.returncode == 0, result.stderr

    [copy] = smtp.to("me@example.com")
    token = copy.message["List-Unsubscribe"].strip("<>").rsplit("/", 1)[1]
    assert Tokens([secret], 3600).read_unsubscribe_token(token) == 0  # signed with the key from the environment
    with pytest.raises(InvalidToken):
        Tokens(["some-other-key"], 3600).read_unsubscribe_token(token)


def test_newsletter_config_variable_is_used_without_option(tmp_path: Path) -> None:
    database = tmp_path / "named-by-variable.db"
    config = write(tmp_path, settings(tmp_path, database=database), name="site.toml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    result = newsletter("db", "upgrade", env={"NEWSLETTER_CONFIG": str(config)}, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert database.exists()
    assert list(elsewhere.iterdir()) == []

    missing = newsletter("db", "upgrade", env={"NEWSLETTER_CONFIG": str(tmp_path / "gone.toml")}, cwd=elsewhere)
    assert "gone.toml" in config_error(missing)


def test_misspelt_environment_variable_is_named(tmp_path: Path) -> None:
    config = write(tmp_path, settings(tmp_path))
    line = config_error(newsletter("--config", str(config), "send", env={"NEWSLETTER_SMTP__HOTS": "mail.example"}))
    assert "NEWSLETTER_SMTP__HOTS" in line


def test_example_config_works_with_only_the_secret_key_set(tmp_path: Path) -> None:
    shutil.copy(ROOT / "config.example.toml", tmp_path / "config.toml")
    result = newsletter(
        "db", "upgrade", env={"NEWSLETTER_SECURITY__SECRET_KEY": "s3cret-for-tests-of-at-least-32-chars"}, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "database upgraded" in result.stdout and (tmp_path / "newsletter.db").is_file()
