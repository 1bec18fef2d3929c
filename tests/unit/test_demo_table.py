"""The demo's results table stays readable on an 80-column terminal, or piped to a file."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from promptq.demo import JobRow, _print_table

ROWS = [
    JobRow(
        job_id=f"job-{i}",
        label=f"welcome Person{i} (Product{i})",
        status="succeeded" if i % 2 else "failed",
        attempts=i + 1,
        latency_ms=1000 * i + 7,
        prompt_tokens=40 + i,
        completion_tokens=123 + i,
        answer="An answer much longer than any column would hold, repeated. " * 3,
    )
    for i in range(3)
]


@pytest.mark.parametrize("width", [80, 100, 200])
def test_every_number_is_printed_whole(width: int) -> None:
    out = io.StringIO()
    _print_table(Console(file=out, width=width, force_terminal=False), ROWS)
    printed = out.getvalue()
    assert max(len(line) for line in printed.splitlines()) <= width
    for row in ROWS:
        for cell in (
            row.status,
            f"{row.latency_ms} ms",
            f"{row.prompt_tokens}/{row.completion_tokens}",
        ):
            assert cell in printed, (cell, printed)
    assert "An answer" in printed
