"""Validating batch items, without I/O: per-line errors, limits, and the storable fast path."""

from __future__ import annotations

import io

import orjson
import pytest

from promptq.batch_items import (
    MAX_LINE_ERRORS,
    ItemSpec,
    check_models,
    plainly_storable,
    read_spool,
    validate_jsonl,
)
from promptq.errors import BatchTooLarge, InvalidBatch, InvalidRequest
from promptq.schemas import SummarizeJobCreate
from promptq.service import MAX_JSON_DEPTH, check_storable


def no_check(request: object) -> None:
    """Accept every request the schema accepts."""


def line(content: str, **extra: object) -> bytes:
    """One prompt item as a JSONL line."""
    item = {"kind": "prompt", "messages": [{"role": "user", "content": content}], **extra}
    return orjson.dumps(item) + b"\n"


def test_valid_lines_are_spooled_in_order_and_read_back() -> None:
    source = io.BytesIO(line("a", custom_id="x") + b"\n" + line("b", max_attempts=2))
    spool = io.BytesIO()
    report = validate_jsonl(source, spool, no_check, max_jobs=10, models=None)
    report.raise_if_invalid()
    items = list(read_spool(spool))
    assert [i.custom_id for i in items] == ["x", None]
    assert [i.input["messages"][0]["content"] for i in items] == ["a", "b"]
    assert items[1].max_attempts == 2
    assert ItemSpec.from_json(items[0].to_json()) == items[0]


def test_errors_name_their_lines_and_are_capped() -> None:
    bad = b"".join(b"{oops\n" for _ in range(MAX_LINE_ERRORS + 5))
    report = validate_jsonl(
        io.BytesIO(line("ok") + bad), io.BytesIO(), no_check, max_jobs=10**6, models=None
    )
    assert report.error_count == MAX_LINE_ERRORS + 5
    assert len(report.errors) == MAX_LINE_ERRORS and report.errors[0]["line"] == 2
    with pytest.raises(InvalidBatch) as raised:
        report.raise_if_invalid()
    assert f"{MAX_LINE_ERRORS + 5} of {MAX_LINE_ERRORS + 6}" in raised.value.message


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        (
            {"kind": "prompt", "messages": [{"role": "user", "content": "x"}], "custom_id": 5},
            "custom_id",
        ),
        ({"kind": "prompt", "messages": [{"role": "user", "content": "x\u0000"}]}, "NUL"),
        ({"kind": "nope"}, "kind"),
        ([1], "JSON object"),
    ],
)
def test_each_kind_of_bad_item_is_explained(item: object, fragment: str) -> None:
    report = validate_jsonl(
        io.BytesIO(orjson.dumps(item) + b"\n"), io.BytesIO(), no_check, max_jobs=5, models=None
    )
    assert report.error_count == 1 and fragment in report.errors[0]["message"]


def test_the_item_limit_counts_models() -> None:
    source = io.BytesIO(line("a") + line("b"))
    with pytest.raises(BatchTooLarge):
        validate_jsonl(source, io.BytesIO(), no_check, max_jobs=3, models=["m1", "m2"])


def test_the_document_size_check_applies() -> None:
    def small(request: object) -> None:
        if isinstance(request, SummarizeJobCreate) and len(request.document) > 3:
            raise InvalidRequest("too large")

    doc = orjson.dumps({"kind": "summarize", "document": "long text"}) + b"\n"
    report = validate_jsonl(io.BytesIO(doc), io.BytesIO(), small, max_jobs=5, models=None)
    assert report.errors == [{"line": 1, "message": "too large"}]


def test_models_are_checked() -> None:
    assert check_models(["a", " b ", "a"]) == ["a", "b"]
    for bad in ([], [""], "a", [1]):
        with pytest.raises(InvalidRequest):
            check_models(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value",
    [
        {"a": "plain"},
        {"a": "nul \u0000"},
        {"a": "backslash-u \\u0000 literally"},
        {"deep": [[[[[[]]]]]]},
        [[]] * 40,
    ],
)
def test_the_fast_path_only_skips_what_would_pass(value: object) -> None:
    raw = orjson.dumps(value)
    if plainly_storable(raw):
        check_storable(value)  # must not raise


def test_too_deep_is_not_plainly_storable() -> None:
    value: object = []
    for _ in range(MAX_JSON_DEPTH + 1):
        value = [value]
    assert not plainly_storable(orjson.dumps(value))
    with pytest.raises(InvalidRequest):
        check_storable(value)
