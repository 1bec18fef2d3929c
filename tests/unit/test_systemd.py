"""The systemd units under deploy/ match the CLI and stop workers gracefully."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

from promptq.settings import Settings
from tests.unit.cli_args import check_promptq_command

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = ["promptq-worker.service", "promptq-api.service"]


def read_unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string((DEPLOY / name).read_text())
    return parser


def exec_lines(unit: configparser.ConfigParser) -> list[list[str]]:
    service = unit["Service"]
    return [shlex.split(service[k]) for k in ("ExecStartPre", "ExecStart") if k in service]


@pytest.mark.parametrize("name", UNITS)
def test_exec_commands_match_the_real_cli(name: str) -> None:
    lines = exec_lines(read_unit(name))
    assert lines
    for argv in lines:
        assert Path(argv[0]).name == "promptq", argv
        check_promptq_command(argv[1:], f"deploy/{name}")


@pytest.mark.parametrize("name", UNITS)
def test_restart_on_failure_with_environment_file(name: str) -> None:
    service = read_unit(name)["Service"]
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["EnvironmentFile"].startswith("/")


def test_worker_stop_timeout_outlasts_its_grace_period() -> None:
    service = read_unit("promptq-worker.service")["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[1] == "worker"
    grace_s = float(argv[argv.index("--grace-s") + 1])
    assert float(service["TimeoutStopSec"]) > grace_s


def test_api_stop_timeout_outlasts_its_grace_period() -> None:
    service = read_unit("promptq-api.service")["Service"]
    grace_s = Settings.model_fields["api_shutdown_grace_s"].default
    assert float(service["TimeoutStopSec"]) > grace_s


def test_the_worker_starts_after_the_api_that_migrates_the_database() -> None:
    # The API unit's ExecStartPre runs `promptq db upgrade`; a worker started before it would
    # find the database behind (and exit, to be restarted)
    assert "promptq db upgrade" in read_unit("promptq-api.service")["Service"]["ExecStartPre"]
    assert "promptq-api.service" in read_unit("promptq-worker.service")["Unit"]["After"].split()


def test_example_environment_names_are_real_settings() -> None:
    fields = {f"PROMPTQ_{name.upper()}" for name in Settings.model_fields}
    lines = (DEPLOY / "promptq.env.example").read_text().splitlines()
    names = [line.lstrip("# ").split("=", 1)[0] for line in lines if "=" in line]
    names = [n for n in names if n.startswith("PROMPTQ_")]
    assert names
    for name in names:
        assert name in fields, f"{name} is not a promptq setting"
