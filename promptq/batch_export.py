"""A batch's results as JSONL or CSV bytes, shared by the API's stream and the CLI."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import orjson

from promptq.batches import RESULT_FIELDS
from promptq.errors import InvalidRequest

FORMATS = ("jsonl", "csv")
CONTENT_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


def check_format(value: str | None) -> str:
    """`jsonl` (the default) or `csv`; InvalidRequest otherwise."""
    fmt = value or "jsonl"
    if fmt not in FORMATS:
        raise InvalidRequest(f"format must be jsonl or csv; got {fmt[:32]!r}")
    return fmt


def header(fmt: str) -> bytes:
    """What comes before the first record: the CSV header row, nothing for JSONL."""
    return _csv_line(RESULT_FIELDS) if fmt == "csv" else b""


def encode(record: dict[str, Any], fmt: str) -> bytes:
    """One result record as a JSONL line or a CSV row."""
    if fmt == "csv":
        return _csv_line(_csv_value(record[name]) for name in RESULT_FIELDS)
    return orjson.dumps(record) + b"\n"


def _csv_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return "" if value is None else value


def _csv_line(values: Iterable[Any]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerow(values)
    return out.getvalue().encode("utf-8")
