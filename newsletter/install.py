"""A first configuration: config.example.toml with the owner's answers filled in and a new secret key."""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
from pathlib import Path

from .config import Config, ConfigError, load_config
from .resources import resource_file

Answers = dict[tuple[str, str], str | int]  # (section, key) -> value

_KEY_LINE = re.compile(r"^(?P<key>[a-z_]+)(?P<eq>\s*=\s*).*$")


def filled_example(answers: Answers) -> str:
    """config.example.toml, comments and all, with each answered key set and a new [security] secret_key."""
    values = {**answers, ("security", "secret_key"): secrets.token_urlsafe(32)}
    section, lines = "", []
    for line in resource_file("config.example.toml").read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("["):
            section = line.strip().strip("[]")
        found = _KEY_LINE.match(line.rstrip("\n"))
        if found and (section, found["key"]) in values:
            value = values.pop((section, found["key"]))
            literal = str(value) if isinstance(value, int) else json.dumps(value, ensure_ascii=False)
            line = f"{found['key']}{found['eq']}{literal}\n"
        lines.append(line)
    if values:
        raise ValueError(f"config.example.toml has no key {sorted(values)[0]}")
    return "".join(lines)


def write_config(path: Path, answers: Answers) -> Config:
    """Write a first configuration to PATH, readable by its owner alone, after checking that it loads.

    Raises FileExistsError when PATH exists (it is never overwritten) and ConfigError saying what to fix."""
    if path.exists():
        raise FileExistsError(path)
    directory = path.resolve().parent
    handle, draft = tempfile.mkstemp(prefix=".config-", suffix=".toml", dir=directory)  # created with mode 0600
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(filled_example(answers))
        config = load_config(draft, environ={})
        os.link(draft, path)  # fails rather than replace a file that appeared meanwhile
    except ConfigError as exc:
        raise ConfigError(str(exc).replace(draft, str(path))) from None
    finally:
        os.unlink(draft)
    return config
