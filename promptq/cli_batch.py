"""`promptq batch ...` and `promptq cancel`: batches from the command line.

Like the rest of the CLI these work on the database and Redis directly (PROMPTQ_DATABASE_URL,
PROMPTQ_REDIS_URL), as the local operator, who sees every batch. The commands that only read
(list, get, results, compare) need no Redis.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich.table import Column, Table
from rich.text import Text

from promptq import batch_export
from promptq import cli_support as cli
from promptq.batch_items import ItemSpec, check_models, check_name, read_spool, validate_jsonl
from promptq.batch_schemas import BatchOut, ComparePage
from promptq.batches import BatchService
from promptq.cancel import Canceller
from promptq.cli_progress import progress_bars
from promptq.errors import InvalidRequest, PromptQError
from promptq.models import BatchStatus, JobStatus
from promptq.service import JobService

logger = logging.getLogger(__name__)

batch_app = typer.Typer(
    help="Batches: many jobs submitted, followed and exported together.", no_args_is_help=True
)

#: How often --wait re-reads the batch.
POLL_S = 0.5
#: Characters of an answer shown in a cell of `promptq batch compare`.
ANSWER_CHARS = 120


def seconds_above_zero(value: float | None) -> float | None:
    """Typer callback: refuse seconds that are not a finite number above 0."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter("must be a number of seconds above 0")
    return value


TimeoutOption = Annotated[
    float, typer.Option(callback=seconds_above_zero, help="How long --wait waits.")
]


@contextmanager
def _validated(path: Path, service: JobService, models: list[str] | None) -> Iterator[IO[bytes]]:
    """The file's items validated (InvalidBatch listing bad lines) and spooled, ready to insert."""
    try:
        source = path.open("rb")
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror or exc}") from None
    with source, tempfile.TemporaryFile() as spool:
        report = validate_jsonl(
            source,
            spool,
            service.check,
            max_jobs=service.settings.batch_max_items,
            models=models,
        )
        report.raise_if_invalid()
        yield spool


@batch_app.command("submit")
def submit(
    file: Annotated[Path, typer.Argument(help="A .jsonl file: one job request per line.")],
    name: Annotated[str | None, typer.Option(help="A name to find the batch by.")] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model", help="Run every item on this model; repeat to compare several models."
        ),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Show progress until every job has finished.")] = False,
    timeout_s: TimeoutOption = 3600.0,
) -> None:
    """Submit a JSONL file as one batch; prints the batch id. An invalid line creates nothing."""
    settings = cli.load_settings()
    err_console = cli.err_console

    async def go() -> BatchOut:
        models = check_models(model) if model else None
        async with cli.open_service(settings) as service:
            batches = BatchService(service)
            with _validated(file, service, models) as spool:
                created = await batches.create(
                    read_spool(spool), owner_key_id=None, name=check_name(name), models=models
                )
            if created.replayed:
                err_console.print(
                    f"every item reused a job of batch {created.batch.id} (same keys): "
                    "that batch was sent before, and is the one shown"
                )
            elif created.reused:
                err_console.print(f"{created.reused} item(s) reused an existing job (same key)")
            if created.cached:
                err_console.print(f"{created.cached} job(s) answered from the result cache")
            if created.following:
                err_console.print(
                    f"{created.following} job(s) wait for an identical job's answer "
                    "instead of calling the model"
                )
            if wait:
                return await _wait(batches, created.batch.id, timeout_s)
            return await batches.get(created.batch.id, owned_by=None)

    batch = cli.run(go())
    if not wait:
        print(batch.id)
        err_console.print(f"batch {batch.id}: {batch.total} job(s) queued")
        return
    _print_batch(batch)
    if batch.counts.failed or batch.counts.cancelled:
        raise typer.Exit(1)


async def _wait(batches: BatchService, batch_id: str, timeout_s: float) -> BatchOut:
    deadline = time.monotonic() + timeout_s
    with progress_bars(cli.err_console) as progress:
        bar = progress.add_task(f"batch {batch_id[:8]}", total=None, state="")
        while True:
            batch = await batches.get(batch_id, owned_by=None)
            counts = batch.counts
            state = f"{counts.running} running, {counts.failed} failed"
            progress.update(bar, total=batch.total, completed=counts.done, state=state)
            if batch.status not in (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING):
                return batch
            if time.monotonic() > deadline:
                raise PromptQError(
                    f"timed out after {timeout_s:g} s; check later with `promptq batch get "
                    f"{batch_id}`"
                )
            await asyncio.sleep(POLL_S)


@batch_app.command("list")
def list_batches(
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
) -> None:
    """List recent batches, newest first."""
    settings = cli.load_settings()

    async def go() -> list[BatchOut]:
        async with cli.open_service(settings, read_only=True) as service:
            rows: list[BatchOut] = await BatchService(service).list_batches(
                limit=limit, before_id=None, owned_by=None
            )
            return rows

    # Ids are never cut or wrapped, so they can be pasted into other commands.
    table = Table(Column("id", no_wrap=True, min_width=36), "name", "status", "done", "tokens")
    for batch in cli.run(go()):
        table.add_row(
            batch.id,
            batch.name or "",
            batch.status,
            f"{batch.progress.done}/{batch.total}",
            str(batch.usage.total_tokens),
        )
    cli.console.print(table)


@batch_app.command("get")
def get(
    batch_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print the batch as JSON.")] = False,
) -> None:
    """Show one batch: status, counts per status, progress and token usage."""
    settings = cli.load_settings()

    async def go() -> BatchOut:
        async with cli.open_service(settings, read_only=True) as service:
            out: BatchOut = await BatchService(service).get(_id(batch_id), owned_by=None)
            return out

    batch = cli.run(go())
    if as_json:
        print(batch.model_dump_json(indent=2))
        return
    _print_batch(batch)


def _print_batch(batch: BatchOut) -> None:
    table = Table(show_header=False, box=None)
    table.add_row("id", batch.id)
    table.add_row("name", batch.name or "")
    table.add_row("status", batch.status)
    if batch.models:
        table.add_row("models", ", ".join(batch.models))
    table.add_row(
        "progress", f"{batch.progress.done}/{batch.total} ({batch.progress.fraction:.0%})"
    )
    counts = batch.counts.model_dump()
    table.add_row("jobs", ", ".join(f"{n} {status}" for status, n in counts.items() if n))
    table.add_row("tokens", f"{batch.usage.prompt_tokens} in / {batch.usage.completion_tokens} out")
    if batch.usage.reused_answers:
        table.add_row(
            "reused",
            f"{batch.usage.reused_answers} answer(s) of identical requests, "
            f"{batch.usage.reused_tokens} tokens, with no model call",
        )
    table.add_row("created", str(batch.created_at))
    cli.console.print(table)


@batch_app.command("results")
def results(
    batch_id: str,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write here instead of stdout.")
    ] = None,
) -> None:
    """Every job's outcome in submission order (status, result, error, usage, latency)."""
    settings = cli.load_settings()

    async def go() -> int:
        checked = batch_export.check_format(fmt)
        async with cli.open_service(settings, read_only=True) as service:
            batches = BatchService(service)
            await batches.get_row(_id(batch_id), owned_by=None)
            sink = _open_output(output) if output else sys.stdout.buffer
            count = 0
            try:
                sink.write(batch_export.header(checked))
                async for record in batches.results(_id(batch_id)):
                    sink.write(batch_export.encode(record, checked))
                    count += 1
            finally:
                if output:
                    sink.close()
                else:
                    sink.flush()
            return count

    count = cli.run(go())
    if output:
        cli.err_console.print(f"wrote {count} result(s) to {output}", soft_wrap=True)


def _open_output(path: Path) -> IO[bytes]:
    try:
        return path.open("wb")
    except OSError as exc:
        raise InvalidRequest(f"cannot write {path}: {exc.strerror or exc}") from None


@batch_app.command("cancel")
def cancel_batch(batch_id: str) -> None:
    """Cancel a batch's unfinished jobs; finished jobs keep their results."""
    settings = cli.load_settings()

    async def go() -> BatchOut:
        async with cli.open_service(settings) as service:
            out: BatchOut = await Canceller(service).cancel_batch(_id(batch_id), owned_by=None)
            return out

    batch = cli.run(go())
    cli.console.print(
        f"batch {batch.id} {batch.status}: {batch.counts.cancelled} cancelled, "
        f"{batch.counts.succeeded} succeeded (kept)"
    )


@batch_app.command("compare")
def compare(
    batch_id: str,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Items to show.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
) -> None:
    """Each item's answers from every model side by side, with latency and tokens."""
    settings = cli.load_settings()

    async def go() -> ComparePage:
        async with cli.open_service(settings, read_only=True) as service:
            batches = BatchService(service)
            batch = await batches.get_row(_id(batch_id), owned_by=None)
            return await batches.compare_page(batch, after_index=None, limit=limit)

    page = cli.run(go())
    if as_json:
        print(page.model_dump_json(indent=2))
        return
    table = Table("#", "prompt", *page.models, show_lines=True)
    for row in page.rows:
        cells: list[Text | str] = []
        for model in page.models:
            answer = row.answers.get(model)
            if answer is None:
                cells.append("")
                continue
            text = answer.result if answer.status == JobStatus.SUCCEEDED else answer.status
            text = _short(text or answer.error or "")
            latency = f"{answer.latency_ms} ms" if answer.latency_ms is not None else "-"
            tokens = f"{answer.prompt_tokens or 0}/{answer.completion_tokens or 0} tok"
            cells.append(Text.assemble(text, "\n", (f"{latency}, {tokens}", "dim")))
        table.add_row(str(row.index), _short(row.prompt), *cells)
    summary = []
    for item in page.summary:
        mean = f"{item.mean_latency_ms:g} ms" if item.mean_latency_ms is not None else "-"
        summary.append(
            Text.assemble(
                (f"{item.succeeded} ok, {item.failed} failed", "bold"),
                f"\nmean {mean}, {item.prompt_tokens}/{item.completion_tokens} tok",
            )
        )
    table.add_row("", Text("whole batch", "bold"), *summary)
    cli.console.print(table)
    if page.next_cursor is not None:
        cli.err_console.print(f"showing the first {limit} items; use --limit for more")


def cancel_job(job_id: str) -> None:
    """Cancel a job: a queued one never runs, a running one is aborted.

    A job that has finished already keeps its result.
    """
    settings = cli.load_settings()

    async def go() -> tuple[str, str]:
        async with cli.open_service(settings) as service:
            job = await Canceller(service).cancel_job(_id(job_id, what="job"), owned_by=None)
            return job.id, job.status

    found_id, status = cli.run(go())
    if status == JobStatus.CANCELLED:
        cli.console.print(f"job {found_id} cancelled")
    else:
        cli.console.print(f"job {found_id} is {status}; its worker is aborting it")


def _id(value: str, *, what: str = "batch") -> str:
    import uuid

    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidRequest(f"no {what} with id {value[:64]!r}") from None


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= ANSWER_CHARS else text[: ANSWER_CHARS - 1] + "…"


def item_specs(requests: list[Any]) -> list[ItemSpec]:
    """ItemSpecs for already validated job requests (for `promptq submit summarize`)."""
    return [ItemSpec.from_request(request) for request in requests]


async def retry_batch(service: JobService, batch_id: str, status: str | None) -> list[str]:
    """Re-queue a batch's failed and cancelled jobs (or only those in `status`); the ids."""
    batches = BatchService(service)
    batch = await batches.get_row(_id(batch_id), owned_by=None)
    statuses = [status] if status else [JobStatus.FAILED, JobStatus.CANCELLED]
    ids = [job_id async for job_id in batches.job_ids(batch.id, statuses=statuses)]
    requeued: list[str] = []
    for start in range(0, len(ids), 500):
        requeued += await service.retry(ids[start : start + 500])
    if requeued:
        await batches.reopen(batch.id)
    return requeued
