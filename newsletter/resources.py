"""Where the templates, migrations and config.example.toml live: beside the package in a checkout, inside it
once installed."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    installed = PACKAGE / name
    return installed if installed.is_dir() else PACKAGE.parent / name


def resource_file(name: str) -> Path:
    installed = PACKAGE / name
    return installed if installed.is_file() else PACKAGE.parent / name
