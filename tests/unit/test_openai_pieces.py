"""Pure pieces of the OpenAI layer: the cache rules, the request hash, the batch-file check,
the fallback chain and the error types, without any I/O."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from api.openai_errors import error_type
from promptq import clock
from promptq.cache import prompt_hash, request_hash, wants_cache
from promptq.models import Batch
from promptq.openai_batch import batch_object
from promptq.openai_batch_input import check_input
from promptq.openai_schemas import BadRequest, parse_chat_request
from promptq.settings import Settings
from promptq.store import Claim
from worker.prompt_call import model_chain

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("params", "cache", "enabled", "expected"),
    [
        ({"temperature": 0}, None, True, True),
        ({"seed": 3}, None, True, True),
        ({"temperature": 0.7}, None, True, False),
        ({}, None, True, False),
        ({}, True, True, True),
        ({"temperature": 0}, False, True, False),
        ({"temperature": 0}, True, False, False),
    ],
)
def test_which_requests_may_reuse_a_stored_answer(
    params: dict[str, Any], cache: bool | None, enabled: bool, expected: bool
) -> None:
    assert wants_cache(params, cache, enabled=enabled) is expected


def test_the_request_hash_ignores_key_order_but_not_content() -> None:
    one = request_hash("prompt", "m", MESSAGES, {"temperature": 0, "seed": 1})
    assert one == request_hash("prompt", "m", MESSAGES, {"seed": 1, "temperature": 0})
    assert one != request_hash("prompt", "m2", MESSAGES, {"temperature": 0, "seed": 1})
    assert one != request_hash("prompt", "m", MESSAGES, {"temperature": 0, "seed": 2})


def test_the_prompt_hash_tells_fallback_models_apart() -> None:
    plain = {"messages": MESSAGES, "params": {"temperature": 0}}
    # No fallback models: the hash is the one such a request always had
    assert prompt_hash("m", plain) == request_hash("prompt", "m", MESSAGES, {"temperature": 0})
    assert prompt_hash("m", plain | {"fallback_models": []}) == prompt_hash("m", plain)
    with_fallback = prompt_hash("m", plain | {"fallback_models": ["f"]})
    assert with_fallback != prompt_hash("m", plain)
    assert with_fallback != prompt_hash("m", plain | {"fallback_models": ["f", "g"]})
    # Nor do how the job is run, or its cache choice, change it
    assert prompt_hash("m", plain | {"stream": True, "cache": False}) == prompt_hash("m", plain)


def test_promptq_fields_are_not_sent_to_the_model_but_openai_extras_are() -> None:
    request = parse_chat_request(
        {
            "model": "m",
            "messages": MESSAGES,
            "stream": True,
            "cache": False,
            "fallback_models": ["n"],
            "max_attempts": 2,
            "response_format": {"type": "json_object"},
            "temperature": 0,
        }
    )
    assert request.params() == {"response_format": {"type": "json_object"}, "temperature": 0}
    assert request.job_input()["stream"] is True
    assert request.job_input()["fallback_models"] == ["n"]


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"model": "m"},
        {"model": "m", "messages": MESSAGES, "n": 2},
        {"model": "", "messages": MESSAGES},
    ],
)
def test_bad_chat_requests_are_400(body: Any) -> None:
    with pytest.raises(BadRequest) as info:
        parse_chat_request(body)
    assert info.value.http_status == 400


def line(custom_id: Any, **changes: Any) -> bytes:
    data = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": MESSAGES},
    } | changes
    return orjson.dumps(data)


def test_every_bad_line_of_a_batch_file_is_reported_with_its_number() -> None:
    content = b"\n".join(
        [
            line("a"),
            b"",  # blank lines are skipped, but still counted
            line("a"),
            line(7),
            line("b", method="GET"),
            line("c", body={"model": "m", "messages": MESSAGES, "stream": True}),
            line("d", body={"model": "other", "messages": MESSAGES}),
            b"[1, 2]",
        ]
    )
    check = check_input(content, "/v1/chat/completions", known_models={"m"})
    assert [(e["line"], e["code"]) for e in check.errors] == [
        (3, "duplicate_custom_id"),
        (4, "missing_required_parameter"),
        (5, "invalid_value"),
        (6, "invalid_value"),
        (7, "model_not_found"),
        (8, "invalid_json_line"),
    ]
    assert [r.custom_id for r in check.requests] == ["a"]


def test_an_empty_batch_file_is_an_error_and_the_model_check_can_be_skipped() -> None:
    assert check_input(b"\n\n", "/v1/chat/completions", None).errors[0]["code"] == "empty_file"
    unchecked = check_input(
        line("x", body={"model": "any", "messages": MESSAGES}), "/v1/chat/completions", None
    )
    assert unchecked.error_count == 0 and len(unchecked.requests) == 1


def claim(charged: int, fallbacks: list[str]) -> Claim:
    return Claim(
        job_id="j",
        number=charged,
        kind="prompt",
        model="a",
        input={"messages": MESSAGES, "fallback_models": fallbacks},
        max_attempts=5,
        charged=charged,
    )


def test_each_retry_starts_one_fallback_further_and_stays_on_the_last() -> None:
    assert model_chain(claim(1, ["b", "c"])) == ["a", "b", "c"]
    assert model_chain(claim(2, ["b", "c"])) == ["b", "c"]
    assert model_chain(claim(5, ["b", "c"])) == ["c"]
    assert model_chain(claim(3, [])) == ["a"]


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (404, "invalid_request_error"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (503, "server_error"),
    ],
)
def test_statuses_map_to_openai_error_types(status: int, kind: str) -> None:
    assert error_type(status) == kind


def test_lines_naming_a_model_their_endpoint_does_not_serve_become_errors_in_line_order() -> None:
    content = b"\n".join(
        [
            line("a", body={"model": "gone", "messages": MESSAGES}),
            b"not json",
            line("b"),
            line("c", body={"model": "m", "messages": MESSAGES, "fallback_models": ["gone"]}),
        ]
    )
    check = check_input(content, "/v1/chat/completions", None)
    check.reject_models({"gone"})
    assert [(e["line"], e["code"]) for e in check.errors] == [
        (1, "model_not_found"),
        (2, "invalid_json_line"),
        (4, "model_not_found"),
    ]
    assert [r.custom_id for r in check.requests] == ["b"]


def test_lines_over_the_message_limits_become_errors_and_the_rest_stay() -> None:
    # Given limits of 2 messages and 1,000 characters per job
    settings = Settings(max_messages_per_job=2, max_message_chars=1000)
    many = [{"role": "user", "content": "hi"}] * 3
    long = [{"role": "user", "content": "x" * 1001}]
    content = b"\n".join(
        [
            line("many", body={"model": "m", "messages": many}),
            line("ok"),
            line("long", body={"model": "m", "messages": long}),
        ]
    )
    # When the file is checked with the settings, each line over a limit is an error naming it
    check = check_input(content, "/v1/chat/completions", None, settings=settings)
    assert [(e["line"], e["code"]) for e in check.errors] == [
        (1, "limit_exceeded"),
        (3, "limit_exceeded"),
    ]
    assert "PROMPTQ_MAX_MESSAGES_PER_JOB" in check.errors[0]["message"]
    assert "PROMPTQ_MAX_MESSAGE_CHARS" in check.errors[1]["message"]
    assert [r.custom_id for r in check.requests] == ["ok"]


@pytest.mark.parametrize(
    ("stamps", "shown"),
    [
        ({}, "finalizing"),
        ({"cancelling_at": True}, "cancelling"),
        ({"expired_at": True}, "in_progress"),
    ],
)
def test_a_batch_writing_its_files_shows_the_status_it_is_on_its_way_to(
    stamps: dict[str, bool], shown: str
) -> None:
    # Given a batch whose output files are being written, on its way to completed, cancelled
    # or expired
    now = clock.now()
    batch = Batch(id="b", status="finalizing", job_count=0, created_at=now, updated_at=now)
    for column in stamps:
        setattr(batch, column, now)
    # Then OpenAI's view names it as OpenAI's lifecycle does: only completed goes through
    # finalizing
    assert batch_object(batch, {})["status"] == shown
