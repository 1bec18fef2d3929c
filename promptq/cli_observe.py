"""CLI pieces for observability: the `--log-format` option and `promptq worker --check`."""

from __future__ import annotations

import asyncio
from enum import StrEnum
from typing import Annotated

import typer

from promptq.settings import Settings


class LogFormat(StrEnum):
    """How the services write their logs."""

    console = "console"
    json = "json"


LogFormatOption = Annotated[
    LogFormat | None,
    typer.Option(
        "--log-format",
        help="console (readable) or json (one object per line) (env PROMPTQ_LOG_FORMAT).",
        case_sensitive=False,
    ),
]


def check_worker(settings: Settings) -> None:
    """Print one line about this host's workers' heartbeat; exit 0 if one is fresh, else 1."""
    from worker.heartbeat import check

    healthy, message = asyncio.run(check(settings))
    print(message)
    raise typer.Exit(0 if healthy else 1)
