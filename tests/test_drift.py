"""What must not drift apart: the config dataclasses and config.example.toml, the models and the
migrations, and the command output README.md shows and what the commands print."""

from __future__ import annotations

import dataclasses
import re
import shlex
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import Column, Integer, MetaData

from newsletter import db
from newsletter.cli import cli
from newsletter.config import SECTIONS, load_config
from newsletter.models import Base

from .conftest import SMTPSink

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def dataclass_keys() -> set[str]:
    return {
        f"[{section}] {f.name.rstrip('_')}" for section, make in SECTIONS.items() for f in dataclasses.fields(make())
    }


def test_config_example_has_every_key_and_no_other() -> None:
    example = tomllib.loads((ROOT / "config.example.toml").read_text(encoding="utf-8"))
    documented = {f"[{section}] {key}" for section, values in example.items() for key in values}
    assert not dataclass_keys() - documented, f"add to config.example.toml: {sorted(dataclass_keys() - documented)}"
    assert not documented - dataclass_keys(), f"not a config key: {sorted(documented - dataclass_keys())}"
    load_config(ROOT / "config.example.toml", environ={"NEWSLETTER_SECURITY__SECRET_KEY": "s3cret-" * 6})


def schema_differences(database_url: str, metadata: MetaData) -> list[object]:
    engine = db.make_engine(database_url)
    try:
        db.upgrade(engine)
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def test_migrations_build_exactly_the_models(database_url: str) -> None:
    """Alembic's autogenerate finds nothing to add: a model change without its migration fails here."""
    assert schema_differences(database_url, Base.metadata) == []


def test_the_latest_revision_read_from_file_names_is_alembics() -> None:
    alembic = AlembicConfig()
    alembic.set_main_option("script_location", str(ROOT / "migrations"))
    scripts = ScriptDirectory.from_config(alembic)
    for script in scripts.walk_revisions():
        assert Path(script.path).name.startswith(f"{script.revision}_"), f"{script.path}: name it {script.revision}_…"
    assert db.head_revision() == scripts.get_current_head()


def test_a_model_change_without_a_migration_is_found(database_url: str) -> None:
    changed = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["subscribers"].append_column(Column("nickname_length", Integer))
    [difference] = schema_differences(database_url, changed)
    assert difference[0] == "add_column" and difference[3].name == "nickname_length"


def readme_session() -> list[tuple[str, list[str]]]:
    """The `$ command` lines of the README's Commands section, each with the lines shown after it."""
    section = README[README.index("## Commands") :]
    block = section[section.index("```\n") + 4 : section.index("\n```", section.index("```\n") + 4)]
    session: list[tuple[str, list[str]]] = []
    for line in block.replace("\\\n", " ").splitlines():
        if line.startswith("$ "):
            session.append((" ".join(line[2:].split()), []))
        elif session:
            session[-1][1].append(line)
    return [(command, "\n".join(shown).rstrip("\n").split("\n")) for command, shown in session]


TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00")


def test_readme_commands_print_what_the_readme_shows(config_file: Path, smtp: SMTPSink, tmp_path: Path) -> None:
    """Replay the README's session on a fresh database; only today's date and timestamps may differ."""
    session = readme_session()
    shown_day = next(out[0].split()[-1] for command, out in session if command == "newsletter subscribers list")
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    runner = CliRunner()
    for command, shown in session:
        if command.startswith("cat "):
            (tmp_path / command.split()[1]).write_text("\n".join(shown) + "\n", encoding="utf-8")
            continue
        args = [str(tmp_path / arg) if (tmp_path / arg).is_file() else arg for arg in shlex.split(command)[1:]]
        result = runner.invoke(cli, ["--config", str(config_file), *args], catch_exceptions=False)
        expected = [TIMESTAMP.sub("<time>", line.replace(shown_day, today)) for line in shown]
        printed = [TIMESTAMP.sub("<time>", line) for line in result.output.splitlines()]
        assert printed == expected, f"README.md shows other output for `{command}`"


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEWSLETTER_CONFIG", raising=False)
    return tmp_path


def test_readme_configuration_errors_are_what_the_command_prints(config_file: Path, in_tmp: Path) -> None:
    section = README[README.index("## Configuration") :]
    shown = re.findall(r"^\$ newsletter send\n(Error: .*)$", section, flags=re.M)
    assert len(shown) == 2
    settings = config_file.read_text(encoding="utf-8")
    (in_tmp / "config.toml").write_text(settings.replace('security = "none"', 'security = "ssl"'), encoding="utf-8")
    bad_value = CliRunner().invoke(cli, ["send"])
    (in_tmp / "config.toml").write_text(settings, encoding="utf-8")
    not_upgraded = CliRunner().invoke(cli, ["send"])
    assert [bad_value.output.strip(), not_upgraded.output.strip()] == shown
    assert bad_value.exit_code == not_upgraded.exit_code == 2
