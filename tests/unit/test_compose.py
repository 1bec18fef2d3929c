"""docker-compose.yml can't run here (no Docker engine), so check that it matches the CLI."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from promptq.cli import app
from promptq.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_defines_the_required_services(compose: dict[str, Any]) -> None:
    assert {"redis", "postgres", "ollama", "migrate", "api", "worker"} <= set(compose["services"])
    redis_cmd = " ".join(compose["services"]["redis"]["command"])
    assert "--appendonly yes" in redis_cmd  # persistence
    assert compose["services"]["migrate"]["restart"] == "no"  # one-shot


def test_worker_can_be_scaled(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("service", ["migrate", "api", "worker"])
def test_service_commands_exist_in_the_real_cli(compose: dict[str, Any], service: str) -> None:
    command = compose["services"][service]["command"]
    assert command[0] == "promptq"
    words = [w for w in command[1:] if not w.startswith("-")]
    options = [w for w in command[1:] if w.startswith("--")]
    path = [w for w in words if not re.fullmatch(r"[\d.]+", w)]
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Commands" not in result.output, f"{command} names a command group, not a command"
    for option in options:
        assert option in result.output, f"{service}: {option} is not an option of {path}"


def test_environment_names_are_real_settings(compose: dict[str, Any]) -> None:
    fields = {f"PROMPTQ_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose["services"].items():
        for key in service.get("environment", {}):
            if key.startswith("PROMPTQ_"):
                assert key in fields, f"{name}: {key} is not a promptq setting"


def test_inline_dockerfile_copies_existing_paths(compose: dict[str, Any]) -> None:
    dockerfile = compose["services"]["api"]["build"]["dockerfile_inline"]
    for line in dockerfile.splitlines():
        match = re.match(r"COPY (.+) \S+$", line.strip())
        if match:
            for source in match.group(1).split():
                assert (ROOT / source).exists(), source
