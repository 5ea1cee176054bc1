"""The `newsletter` command: it parses arguments, calls the services and prints, one module per area."""

from __future__ import annotations

from .base import Failure, cli, main
from .inbound import inbound
from .posts import posts, send
from .setup import config_group, init
from .site import check, db_group, demo, embed, serve, stats, worker
from .subscribers import subscribers

for _command in (
    init,
    config_group,
    db_group,
    serve,
    worker,
    posts,
    send,
    subscribers,
    embed,
    check,
    stats,
    inbound,
    demo,
):
    cli.add_command(_command)

__all__ = ["Failure", "cli", "main"]
