"""`promptq batch ...`, `promptq cancel` and `promptq retry --batch` as a user runs them.

Given a JSONL file and a real `promptq worker` process, when the batch commands are run, then a
batch is submitted (or refused with the bad line named), cancelled, retried, waited for,
exported and compared; `promptq submit summarize FOLDER` makes a batch of its files.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import orjson
import pytest

from promptq.service import JobService
from tests.conftest import wait_terminal
from tests.e2e.conftest import Procs

pytestmark = pytest.mark.e2e

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def write_jsonl(path: Path, contents: list[str]) -> Path:
    """A JSONL file of prompt jobs."""
    lines = [
        orjson.dumps({"kind": "prompt", "messages": [{"role": "user", "content": c}]})
        for c in contents
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_batch_commands(procs: Procs, service: JobService, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "prompt", "messages": [{"role": "user", "content": "ok"}]}\n{oops\n')
    refused = await procs.run("batch", "submit", str(bad))
    assert refused.returncode == 2 and "line 2" in refused.stderr, refused.stderr

    jobs = write_jsonl(tmp_path / "jobs.jsonl", ["alpha", "beta", "gamma"])
    submitted = await procs.run("batch", "submit", str(jobs), "--name", "first")
    assert submitted.returncode == 0, submitted.stderr
    first = submitted.stdout.strip()
    assert UUID.fullmatch(first)
    ids = [job.id for job in await service.store.list_jobs(batch_id=first)]
    assert len(ids) == 3

    one = await procs.run("cancel", ids[0])
    assert one.returncode == 0 and "cancelled" in one.stdout, one.stderr
    whole = await procs.run("batch", "cancel", first)
    assert whole.returncode == 0 and "cancelled" in whole.stdout, whole.stderr
    again = await procs.run("batch", "cancel", first)
    assert again.returncode == 1 and "already cancelled" in " ".join(again.stderr.split())
    retried = await procs.run("retry", "--batch", first)
    assert retried.returncode == 0 and "3 job(s) re-queued" in retried.stdout, retried.stderr

    procs.start("worker", name="worker")
    compared = await procs.run(
        "batch", "submit", str(jobs), "--model", "fake-small", "--model", "fake-large", "--wait"
    )
    assert compared.returncode == 0, compared.stderr + procs.logs()
    second = UUID.findall(compared.stdout)[0]
    await wait_terminal(service.store, ids)

    shown = await procs.run("batch", "get", first)
    assert shown.returncode == 0 and "completed" in shown.stdout and "3 succeeded" in shown.stdout

    out = tmp_path / "out.csv"
    exported = await procs.run("batch", "results", second, "--format", "csv", "-o", str(out))
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["index"] for r in rows] == ["0", "0", "1", "1", "2", "2"]
    assert {r["status"] for r in rows} == {"succeeded"}

    table = await procs.run("batch", "compare", second)
    assert table.returncode == 0 and "fake-large" in table.stdout and "alpha" in table.stdout

    listed = await procs.run("batch", "list")
    assert first in listed.stdout and second in listed.stdout

    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("a.txt", "b.txt"):
        (docs / name).write_text(f"The document {name} says something worth summarizing.")
    summarized = await procs.run("submit", "summarize", str(docs), "--wait")
    assert summarized.returncode == 0, summarized.stderr + procs.logs()
    batch_id = UUID.findall(summarized.stderr)[0]
    got = await procs.run("batch", "get", batch_id, "--json")
    assert orjson.loads(got.stdout)["counts"]["succeeded"] == 2
