"""Metrics labels stay bounded whatever model names clients submit."""

from __future__ import annotations

import logging

import pytest

from promptq.metrics import MAX_MODEL_LABELS, OTHER_MODEL, Metrics


def model_labels(metrics: Metrics) -> set[str]:
    """The `model` label values of the LLM latency histogram in the registry."""
    return {
        sample.labels["model"]
        for family in metrics.registry.collect()
        if family.name == "promptq_llm_request_duration_seconds"
        for sample in family.samples
    }


def test_models_past_the_cap_are_counted_as_other(caplog: pytest.LogCaptureFixture) -> None:
    # Given a process's metrics, when calls to many more distinct models than the cap end
    metrics = Metrics()
    names = [f"client-model-{i}" for i in range(MAX_MODEL_LABELS + 50)]
    with caplog.at_level(logging.WARNING, logger="promptq.metrics"):
        for name in names + names[:3]:
            metrics.llm_call(
                model=name, endpoint="h:1", outcome="ok", duration_s=0.1, prompt_tokens=1
            )

    # Then the first MAX_MODEL_LABELS keep their names, the rest share OTHER_MODEL, and a
    # model seen before the cap keeps its own label; the cap is logged once
    assert model_labels(metrics) == {*names[:MAX_MODEL_LABELS], OTHER_MODEL}
    assert caplog.text.count("further ones are labelled") == 1
    tokens = {
        (sample.labels["model"], sample.labels["type"]): sample.value
        for family in metrics.registry.collect()
        if family.name == "promptq_llm_tokens"
        for sample in family.samples
        if sample.name == "promptq_llm_tokens_total"
    }
    assert tokens[(names[0], "prompt")] == 2 and tokens[(OTHER_MODEL, "prompt")] == 50
