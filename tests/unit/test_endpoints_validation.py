"""Endpoint config validation (promptq.endpoints): rates that windows can't honour, values no
call can use, malformed URLs and env vars, and what `promptq endpoints` prints (no I/O)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from promptq.cli_endpoints import _row
from promptq.endpoints import DEFAULT_ENDPOINT, LimitsConfig, load_endpoints, redact_url
from promptq.errors import ConfigError
from promptq.settings import Settings


def settings(**values: Any) -> Settings:
    base: dict[str, Any] = {"llm_base_url": "http://fallback:1/v1", "llm_timeout_s": 7.0}
    return Settings(_env_file=None, **(base | values))  # type: ignore[call-arg]


def load(**endpoint: Any) -> Any:
    config = [{"name": "x", "models": ["*"], "base_url": "http://x/v1"} | endpoint]
    return load_endpoints(settings(endpoints=json.dumps(config)), environ={})


def refusal(**endpoint: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load(**endpoint)
    return caught.value.message


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({"rpm": 3, "window_s": 10}, "window_s to at least 20 (60 / rpm) or rpm to at least 6"),
        ({"tpm": 5, "window_s": 6}, "window_s to at least 12 (60 / tpm) or tpm to at least 10"),
        ({"rpm": 11, "window_s": 10}, "6 per minute instead of 11: use window_s = 5.4546 or"),
        ({"tpm": 100, "window_s": 7}, "use window_s = 6.6 or 7.2 or 60"),
    ],
)
def test_a_rate_the_window_cannot_honour_is_refused(limits: dict[str, Any], expected: str) -> None:
    message = refusal(limits=limits)
    field = next(iter(limits))
    assert message.startswith("invalid endpoints config in PROMPTQ_ENDPOINTS: endpoints[0].limits")
    assert f"{field} = {limits[field]} with window_s = {limits['window_s']}" in message
    assert expected in message


def test_a_suggested_window_is_accepted_and_never_exceeds_the_rate() -> None:
    limits = load(limits={"rpm": 11, "window_s": 10.9091}).resolve("m").limits
    assert limits.per_window(11) == 2
    assert limits.effective_per_minute(11) <= 11


@pytest.mark.parametrize("rate", [1, 7, 11, 60, 100, 499, 500, 1001, 200_000, 1_000_000])
@pytest.mark.parametrize("window_s", [1, 2.5, 7, 10, 30, 60, 61, 3600])
def test_an_accepted_rate_is_never_exceeded_and_barely_rounded(rate: int, window_s: float) -> None:
    try:
        limits = LimitsConfig(rpm=rate, tpm=rate, window_s=window_s)
    except ValueError:
        return
    effective = limits.effective_per_minute(rate)
    assert effective is not None
    assert 0.99 * rate <= effective <= rate
    assert limits.per_window(rate) == limits.per_window(limits.tpm) >= 1


def test_whole_rates_are_exact() -> None:
    limits = load(limits={"rpm": 600, "tpm": 6000, "window_s": 10}).resolve("m").limits
    assert (limits.per_window(limits.rpm), limits.per_window(limits.tpm)) == (100, 1000)
    assert limits.effective_per_minute(limits.rpm) == 600


def test_infinite_and_huge_values_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.toml"
    base = '[[endpoints]]\nname = "x"\nmodels = ["*"]\nbase_url = "http://x/v1"\n'
    for line, field in (
        ("timeout_s = inf", "endpoints[0].timeout_s"),
        ("timeout_s = nan", "endpoints[0].timeout_s"),
        ("timeout_s = 1e300", "endpoints[0].timeout_s"),
        ("[endpoints.limits]\nmax_in_flight = 2\nlatency_ratio = inf", "limits.latency_ratio"),
        ("[endpoints.limits]\nrpm = 60\nwindow_s = nan", "limits.window_s"),
        ("[endpoints.limits]\nmax_in_flight = 2\ndecrease_factor = nan", "decrease_factor"),
    ):
        path.write_text(base + line + "\n")
        with pytest.raises(ConfigError) as caught:
            load_endpoints(settings(endpoints_file=path), environ={})
        assert field in caught.value.message, line
    assert load(timeout_s=86_400).resolve("m").timeout_s == 86_400


@pytest.mark.parametrize(
    "url",
    ["http://", "https://", "http:///v1", "ftp://x/v1", "localhost:11434/v1", "http://x:99999/v1"],
)
def test_a_base_url_needs_http_and_a_host(url: str) -> None:
    message = refusal(base_url=url)
    assert "endpoints[0].base_url: base_url must be an http:// or https:// URL with a host" in (
        message
    )


def test_a_base_url_error_never_shows_its_credentials() -> None:
    message = refusal(base_url="http://user:hunter2@x:99999/v1")
    assert "hunter2" not in message


def test_a_password_in_a_base_url_is_never_printed() -> None:
    table = load(base_url="http://user:hunter2@llm.example:8080/v1?x=1")
    endpoint = table.resolve("m")
    row = _row(endpoint, None)
    assert row["base_url"] == "http://user:***@llm.example:8080/v1?x=1"
    assert "hunter2" not in json.dumps(row)
    assert redact_url("https://[::1]:8/v1") == "https://[::1]:8/v1"
    assert redact_url("https://k:s@[::1]:8/v1") == "https://k:***@[::1]:8/v1"
    # the calls still go with the credentials
    assert endpoint.base_url == "http://user:hunter2@llm.example:8080/v1?x=1"


def test_the_json_of_promptq_endpoints_is_valid_json() -> None:
    table = load(timeout_s=300, limits={"rpm": 500, "window_s": 10})
    rows = [_row(endpoint, None) for endpoint in table.endpoints]
    text = json.dumps(rows, allow_nan=False)  # no Infinity or NaN
    assert json.loads(text)[0]["effective_per_minute"] == {"rpm": 498.0}
    assert rows[0]["limits_text"] == "rpm 500 (83 per 10 s, 498/min)"


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ('{"name": "x", "models": ["*"], "base_url": "http://x/v1"}', "object"),
        ('"x"', "str"),
        ("42", "int"),
    ],
)
def test_promptq_endpoints_must_be_a_list(value: str, kind: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_endpoints(settings(endpoints=value), environ={})
    assert caught.value.message.startswith("PROMPTQ_ENDPOINTS must be a JSON list of endpoints")
    assert caught.value.message.endswith(f"not a single {kind}")


def test_an_empty_endpoints_file_variable_counts_as_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROMPTQ_ENDPOINTS_FILE", "")
    monkeypatch.setenv("PROMPTQ_ENDPOINTS", "")
    table = load_endpoints(settings(), environ={})
    assert [e.name for e in table.endpoints] == [DEFAULT_ENDPOINT]
    assert not table.has_limits
    # with PROMPTQ_ENDPOINTS set, an empty PROMPTQ_ENDPOINTS_FILE is not "both"
    config = '[{"name": "x", "models": ["*"], "base_url": "http://x/v1"}]'
    monkeypatch.setenv("PROMPTQ_ENDPOINTS", config)
    assert load_endpoints(settings(), environ={}).resolve("m").name == "x"
