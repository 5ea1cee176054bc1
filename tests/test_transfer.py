"""Moving an installation to another database (to PostgreSQL when the tests have one): readers, consent,
posts and the send ledger arrive, and a send from the new database sends nothing twice."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import empty_database, publish


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'newsletter.db'}"  # the installation starts on SQLite


@pytest.fixture
def target_url(tmp_path: Path) -> Iterator[str]:
    with empty_database(tmp_path, "moved") as url:
        yield url


def test_a_moved_installation_sends_nothing_twice_and_keeps_who_left(
    run, smtp, feed, config_file: Path, target_url: str
) -> None:
    run("posts", "fetch")
    for reader in ("ada@example.org", "ken@example.org", "lin@example.org"):
        run("subscribers", "add", reader, "--confirmed")
    run("subscribers", "remove", "ken@example.org")
    publish(feed, "Before the move", "before")
    assert run("send").exit_code == 0
    run("subscribers", "add", "ken@example.org", "--confirmed")
    old_list = run("subscribers", "export").output

    copied = run("db", "copy", target_url)
    assert copied.exit_code == 0, copied.output
    assert copied.output.startswith("copied ") and "subscribers 3" in copied.output
    again = run("db", "copy", target_url)
    assert again.exit_code == 1 and "already holds rows" in again.output

    moved = config_file.read_text().replace(
        f'url = "sqlite:///{config_file.parent / "newsletter.db"}"', f'url = "{target_url}"'
    )
    assert moved != config_file.read_text()
    config_file.write_text(moved)  # [database] url set to the new database
    assert run("subscribers", "export").output == old_list
    smtp.clear()
    assert run("send").exit_code == 0
    assert smtp.messages == []  # the post went out before the move
    publish(feed, "After the move", "after")
    assert run("send").exit_code == 0
    assert sorted(r for m in smtp.messages for r in m.recipients) == [
        "ada@example.org",
        "ken@example.org",
        "lin@example.org",
    ]
    run("subscribers", "add", "new@example.org", "--confirmed")  # new rows get new ids after the copied ones
    assert "new@example.org" in run("subscribers", "export").output
