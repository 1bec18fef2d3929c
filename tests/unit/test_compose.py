"""docker-compose.yml can't run here (no Docker engine), so check that it matches the CLI."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from promptq.settings import Settings
from tests.unit.cli_args import check_promptq_command

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


def promptq_commands(compose: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Every `promptq ...` command line in the file: service commands and healthchecks."""
    found = []
    for name, service in compose["services"].items():
        lines = [service.get("command") or [], service.get("healthcheck", {}).get("test") or []]
        for line in lines:
            words = [w for w in line if w != "CMD"] if isinstance(line, list) else line.split()
            if words and words[0] == "promptq":
                found.append((name, words[1:]))
    return found


def test_every_promptq_command_matches_the_real_cli(compose: dict[str, Any]) -> None:
    commands = promptq_commands(compose)
    assert {name for name, _ in commands} >= {"migrate", "api", "worker"}
    for name, argv in commands:
        check_promptq_command(argv, f"docker-compose.yml service {name}")


def test_ollama_pulls_the_default_model_once(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["ollama"]["healthcheck"]["test"]
    pull = services["ollama-pull"]
    assert pull["depends_on"]["ollama"]["condition"] == "service_healthy"
    assert pull["restart"] == "no"
    assert [*pull["entrypoint"], *pull["command"]][:2] == ["ollama", "pull"]
    assert "PROMPTQ_DEFAULT_MODEL" in pull["command"][1]  # the model the workers ask for
    worker_needs = services["worker"]["depends_on"]["ollama-pull"]["condition"]
    assert worker_needs == "service_completed_successfully"


def test_health_checks(compose: dict[str, Any]) -> None:
    worker, api = compose["services"]["worker"], compose["services"]["api"]
    assert [w for w in worker["healthcheck"]["test"] if w != "CMD"] == [
        "promptq",
        "worker",
        "--check",
    ]
    assert "/healthz" in " ".join(api["healthcheck"]["test"])


def test_stop_grace_outlasts_the_worker_grace(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    command = worker["command"]
    grace_s = float(command[command.index("--grace-s") + 1])
    assert worker["stop_signal"] == "SIGTERM"
    assert float(worker["stop_grace_period"].rstrip("s")) > grace_s


def test_stop_grace_outlasts_the_api_grace(compose: dict[str, Any]) -> None:
    # compose's default before SIGKILL is 10 s
    api = compose["services"]["api"]
    stop_s = float(str(api.get("stop_grace_period", "10s")).rstrip("s"))
    grace_s = float(api.get("environment", {}).get("PROMPTQ_API_SHUTDOWN_GRACE_S", 0) or 0)
    assert stop_s > (grace_s or Settings.model_fields["api_shutdown_grace_s"].default)


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
