"""The CLI's --help names the environment variable behind each option that has one, and every
variable it names is a real setting (rich markup once swallowed `[env ...]` hints)."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from promptq.cli import app
from promptq.settings import Settings

ENV_HINT = re.compile(r"\(env (PROMPTQ_[A-Z_]+)\)")


def help_text(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.output


def test_worker_help_names_the_settings_behind_its_options() -> None:
    hints = set(ENV_HINT.findall(help_text("worker")))
    assert {
        "PROMPTQ_WORKER_CONCURRENCY",
        "PROMPTQ_WORKER_GRACE_S",
        "PROMPTQ_WORKER_METRICS_PORT",
        "PROMPTQ_LOG_FORMAT",
    } <= hints


def test_every_named_variable_is_a_real_setting() -> None:
    named = set()
    for command in (("worker",), ("api",), ("submit", "prompt"), ("submit", "summarize")):
        named |= set(ENV_HINT.findall(help_text(*command)))
    assert named
    fields = {name.upper() for name in Settings.model_fields}
    assert {name.removeprefix("PROMPTQ_") for name in named} <= fields
