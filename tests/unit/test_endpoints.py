"""Endpoint config parsing and routing (promptq.endpoints): no I/O beyond a temp file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from promptq.endpoints import DEFAULT_ENDPOINT, load_endpoints
from promptq.errors import ConfigError
from promptq.settings import Settings

SAMPLE = """
[[endpoints]]
name = "ollama"
models = ["llama*", "qwen2.5:*"]
base_url = "http://localhost:11434/v1/"
timeout_s = 300
[endpoints.limits]
max_in_flight = 4
adaptive = true

[[endpoints]]
name = "openai"
models = ["gpt-*"]
base_url = "https://api.openai.com/v1"
api_key_env = "MY_OPENAI_KEY"
[endpoints.limits]
rpm = 500
tpm = 200000
per = "model"
"""


def settings(**values: Any) -> Settings:
    base: dict[str, Any] = {"llm_base_url": "http://fallback:1/v1", "llm_timeout_s": 7.0}
    return Settings(_env_file=None, **(base | values))  # type: ignore[call-arg]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "endpoints.toml"
    path.write_text(text)
    return path


def test_without_config_everything_goes_to_the_default_endpoint() -> None:
    table = load_endpoints(settings(llm_api_key="sk-x"), environ={})
    endpoint = table.resolve("anything")
    assert endpoint.name == DEFAULT_ENDPOINT
    assert (endpoint.base_url, endpoint.timeout_s) == ("http://fallback:1/v1", 7.0)
    assert endpoint.key_is_set
    assert not table.has_limits


def test_toml_routes_by_first_matching_pattern(tmp_path: Path) -> None:
    path = write(tmp_path, SAMPLE)
    table = load_endpoints(settings(endpoints_file=path), environ={"MY_OPENAI_KEY": "sk-1"})
    assert table.resolve("llama3.2").name == "ollama"
    assert table.resolve("qwen2.5:7b").name == "ollama"
    assert table.resolve("gpt-4o-mini").name == "openai"
    assert table.resolve("mistral").name == DEFAULT_ENDPOINT
    ollama = table.resolve("llama3.2")
    assert ollama.base_url == "http://localhost:11434/v1"
    assert ollama.timeout_s == 300
    assert not ollama.key_is_set
    openai = table.resolve("gpt-4o")
    assert openai.key_is_set and openai.api_key is not None
    assert openai.api_key.get_secret_value() == "sk-1"
    assert openai.timeout_s == 7.0  # the default timeout
    assert openai.scope("gpt-4o") == "openai/gpt-4o"  # per = "model"
    assert ollama.scope("llama3.2") == "ollama"
    assert table.has_limits


def test_first_match_wins_in_file_order() -> None:
    config = [
        {"name": "special", "models": ["gpt-4o"], "base_url": "http://a/v1"},
        {"name": "general", "models": ["gpt-*"], "base_url": "http://b/v1"},
    ]
    table = load_endpoints(settings(endpoints=json.dumps(config)), environ={})
    assert table.resolve("gpt-4o").name == "special"
    assert table.resolve("gpt-4o-mini").name == "general"


def test_json_env_var_with_an_endpoints_key() -> None:
    config = {"endpoints": [{"name": "x", "models": ["*"], "base_url": "http://x/v1"}]}
    table = load_endpoints(settings(endpoints=json.dumps(config)), environ={})
    assert table.resolve("m").name == "x"
    assert table.source == "PROMPTQ_ENDPOINTS"


def test_rates_per_window() -> None:
    config = [
        {
            "name": "x",
            "models": ["*"],
            "base_url": "http://x/v1",
            "limits": {"rpm": 600, "tpm": 6000, "window_s": 10},
        }
    ]
    limits = load_endpoints(settings(endpoints=json.dumps(config)), environ={}).resolve("m").limits
    assert (limits.per_window(limits.rpm), limits.per_window(limits.tpm)) == (100, 1000)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (SAMPLE.replace("rpm = 500", "rpm = 0"), "endpoints[1].limits.rpm"),
        (SAMPLE.replace('per = "model"', 'per = "job"'), "endpoints[1].limits.per"),
        (SAMPLE.replace("timeout_s = 300", "timeout = 300"), "endpoints[0].timeout"),
        (SAMPLE.replace('name = "openai"', 'name = "ollama"'), "unique"),
        (SAMPLE.replace("max_in_flight = 4\n", ""), "adaptive = true needs max_in_flight"),
        (SAMPLE.replace('"http://localhost', '"localhost'), "endpoints[0].base_url"),
        (SAMPLE.replace('api_key_env = "MY_OPENAI_KEY"', 'api_key_env = "sk-abc"'), "api_key_env"),
        ("[[endpoints]]\nname = 'x'\n", "endpoints[0].models"),
        ("[[endpoints]\n", "not valid TOML"),
    ],
)
def test_a_bad_file_names_the_file_and_the_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_endpoints(settings(endpoints_file=path), environ={})
    assert str(path) in caught.value.message
    assert expected in caught.value.message


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"cannot read the endpoints file .*nope\.toml"):
        load_endpoints(settings(endpoints_file=path), environ={})


def test_bad_json_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="PROMPTQ_ENDPOINTS is not valid JSON"):
        load_endpoints(settings(endpoints="[{"), environ={})


def test_a_key_value_never_appears_in_errors(tmp_path: Path) -> None:
    path = write(tmp_path, SAMPLE.replace("rpm = 500", "rpm = -1"))
    with pytest.raises(ConfigError) as caught:
        load_endpoints(settings(endpoints_file=path), environ={"MY_OPENAI_KEY": "sk-secret"})
    assert "sk-secret" not in caught.value.message


def test_file_and_env_together_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, SAMPLE)
    with pytest.raises(ConfigError, match="not both"):
        load_endpoints(settings(endpoints_file=path, endpoints="[]"), environ={})
