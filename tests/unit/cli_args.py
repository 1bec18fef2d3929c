"""Check a `promptq ...` command line (from compose, systemd, docs) against the real CLI."""

from __future__ import annotations

import re
from typing import Any

import typer.main
from typer.testing import CliRunner

from promptq.cli import app


def check_promptq_command(argv: list[str], where: str) -> None:
    """Fail unless `argv` (after `promptq`) names a real command with real, valid options.

    Each option must appear in the command's real `--help`, and the whole command line must
    parse (option types, ranges, choices) as the CLI would parse it, without running it.
    """
    assert argv, where
    words = [w for w in argv if not w.startswith("-")]
    options = [w.split("=", 1)[0] for w in argv if w.startswith("--")]
    command: Any = typer.main.get_command(app)
    path: list[str] = []
    for word in words:
        if word not in getattr(command, "commands", {}):
            break
        command = command.commands[word]
        path.append(word)
    assert path and not hasattr(command, "commands"), f"{where}: {argv} names no promptq command"
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Commands" not in result.output, f"{where}: {argv} names a command group"
    for option in options:
        assert re.search(rf"{re.escape(option)}\b", result.output), (
            f"{where}: {option} is not an option of `promptq {' '.join(path)}`"
        )
    rest = argv[len(path) :]
    # Parses and validates like the real CLI (raises a usage error if wrong), runs nothing.
    command.make_context("promptq " + " ".join(path), list(rest))
