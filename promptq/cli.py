"""The `promptq` command line: run the services, submit jobs, read them back."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from promptq.cli_batch import TimeoutOption, batch_app, cancel_job, seconds_above_zero
from promptq.cli_endpoints import show_endpoints
from promptq.cli_observe import LogFormatOption, check_worker
from promptq.cli_support import (
    console,
    err_console,
    fail,
    first_query,
    listening_on,
    load_settings,
    make_engine,
    open_database,
    open_service,
    open_store,
    preflight,
    print_columns,
    run,
)
from promptq.db import create_sessionmaker, redact_url
from promptq.errors import InvalidRequest, PromptQError
from promptq.models import TERMINAL_STATUSES, ApiKey, Job, JobKind, JobStatus
from promptq.schemas import AttemptOut, JobOut
from promptq.service import JobService, parse_job_request
from promptq.settings import Settings
from promptq.store import IDS_PER_STATEMENT, RETRYABLE, JobStore

app = typer.Typer(help="promptq: a persistent job queue for LLM work.", no_args_is_help=True)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
submit_app = typer.Typer(help="Submit jobs.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys for the HTTP API.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(submit_app, name="submit")
app.add_typer(keys_app, name="keys")
app.add_typer(batch_app, name="batch")
app.command("cancel")(cancel_job)
app.command("endpoints")(show_endpoints)

# -- services --------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Migrate the database to the newest schema (or to REVISION)."""
    from promptq import migrate

    _migrate(load_settings(), migrate.upgrade, revision)


@db_app.command("downgrade")
def db_downgrade(revision: str) -> None:
    """Migrate the database down to REVISION (`base` removes every table)."""
    from promptq import migrate

    _migrate(load_settings(), migrate.downgrade, revision)


def _migrate(settings: Settings, command: Callable[[Settings, str], None], revision: str) -> None:
    """Run an alembic command, then print the revision the database is really at."""
    from alembic.util import CommandError

    from promptq import migrate

    run(_database_revision(settings))  # an unusable database is reported before alembic runs
    try:
        command(settings, revision)
    except CommandError as exc:
        fail(f"{exc}; revisions go from `base` to {migrate.head_revision()} (`head`)", 2)
    now = run(_database_revision(settings))
    where = {None: "base (no promptq tables)", migrate.head_revision(): f"head ({now})"}
    console.print(
        f"database {redact_url(settings.resolved_database_url)} is at {where.get(now, now)}",
        soft_wrap=True,
    )


async def _database_revision(settings: Settings) -> str | None:
    """The migration the database is at (None: none yet)."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy.engine import Connection

    def current(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    engine = make_engine(settings)
    try:

        async def query() -> str | None:
            async with engine.connect() as connection:
                return await connection.run_sync(current)

        return await first_query(settings, query())
    finally:
        await engine.dispose()


@asynccontextmanager
async def open_keys(settings: Settings) -> Any:
    """A KeyStore on its own (checked) engine, closed on exit."""
    from promptq.keys import KeyStore

    async with open_database(settings) as engine:
        yield KeyStore(create_sessionmaker(engine))


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="A unique name, e.g. the team or service.")],
    admin: Annotated[bool, typer.Option(help="May see and read every job.")] = False,
) -> None:
    """Create a key and print it: the only time it is shown (only its hash is stored)."""
    settings = load_settings()

    async def go() -> tuple[ApiKey, str]:
        async with open_keys(settings) as keys:
            created: tuple[ApiKey, str] = await keys.create(name, admin=admin)
            return created

    row, key = run(go())
    # The key alone on stdout, so `KEY=$(promptq keys create --name x)` works.
    print(key)
    role = "admin key" if row.is_admin else "key"
    err_console.print(
        Text.assemble(
            f"created {role} ",
            (row.name, "bold"),
            f" (id {row.id}, prefix {row.prefix}). Save it now: it cannot be shown again.",
        ),
        soft_wrap=True,
    )


@keys_app.command("list")
def keys_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print the keys as JSON.")] = False,
) -> None:
    """List keys: name, id, prefix, admin, created, revoked (never the keys themselves)."""
    settings = load_settings()

    async def go() -> list[ApiKey]:
        async with open_keys(settings) as keys:
            rows: list[ApiKey] = await keys.list()
            return rows

    keys = run(go())
    if as_json:
        print(json.dumps([_key_json(row) for row in keys], indent=2))
        return
    print_columns(
        ["name", "id", "prefix", "admin", "created", "revoked"],
        [
            [
                row.name,
                row.id,
                row.prefix,
                "yes" if row.is_admin else "no",
                _when(row.created_at),
                _when(row.revoked_at),
            ]
            for row in keys
        ],
    )


@keys_app.command("revoke")
def keys_revoke(name_or_id: str) -> None:
    """Revoke a key by name or id; running APIs refuse it within PROMPTQ_API_KEY_CACHE_S."""
    settings = load_settings()

    async def go() -> ApiKey:
        async with open_keys(settings) as keys:
            row: ApiKey = await keys.revoke(name_or_id)
            return row

    row = run(go())
    console.print(f"key {row.name} ({row.prefix}…) revoked at {_when(row.revoked_at)}")


def _key_json(row: ApiKey) -> dict[str, Any]:
    return {
        "name": row.name,
        "id": row.id,
        "prefix": row.prefix,
        "admin": row.is_admin,
        "created_at": row.created_at.isoformat(),
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
    }


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else ""


def use_fast_event_loop(settings: Settings) -> None:
    """Run on uvloop's event loop (about a third less CPU per job) when it is installed and
    PROMPTQ_UVLOOP is not false; else on asyncio's own."""
    if not settings.uvloop:
        return
    try:
        import uvloop
    except ImportError:  # not on this platform (uvloop has no Windows build)
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


PortOption = Annotated[
    int | None, typer.Option(min=0, max=65535, help="Port to listen on (env PROMPTQ_API_PORT).")
]


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Interface to bind.")] = None,
    port: PortOption = None,
    log_format: LogFormatOption = None,
) -> None:
    """Serve the HTTP API (and its Prometheus /metrics) until Ctrl-C / SIGTERM."""
    from aiohttp import web

    from api.app import create_app

    settings = load_settings(log_format)
    if port is not None:
        settings = settings.with_overrides(api_port=port)
    run(preflight(settings))
    use_fast_event_loop(settings)
    host = host or settings.api_host
    with listening_on(host, settings.api_port):
        web.run_app(
            create_app(settings),
            host=host,
            port=settings.api_port,
            print=lambda msg: logging.getLogger("promptq.api").info(msg.strip()),
            access_log=None,
            shutdown_timeout=settings.api_shutdown_grace_s,
        )


@app.command()
def worker(
    concurrency: Annotated[
        int | None,
        typer.Option(
            min=1, help="Jobs calling the model at once (env PROMPTQ_WORKER_CONCURRENCY)."
        ),
    ] = None,
    burst: Annotated[bool, typer.Option(help="Exit once the queue is empty.")] = False,
    grace_s: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="On SIGTERM, seconds in-flight jobs may finish (env PROMPTQ_WORKER_GRACE_S).",
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Serve Prometheus /metrics on this port (env PROMPTQ_WORKER_METRICS_PORT).",
        ),
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Don't run a worker: exit 0 if a worker on this host has a fresh heartbeat, "
            "else 1 (for health probes).",
        ),
    ] = False,
    log_format: LogFormatOption = None,
) -> None:
    """Run a worker daemon until Ctrl-C / SIGTERM.

    On the first signal it stops taking jobs and lets in-flight ones finish for up to
    --grace-s; what is still running then goes back to the queue, recorded as interrupted
    (not charged against max_attempts). A second signal skips the wait.
    """
    from worker.app import create_worker

    settings = load_settings(log_format)
    if check:
        check_worker(settings)
    overrides: dict[str, Any] = {}
    if concurrency is not None:
        overrides["worker_concurrency"] = concurrency
    if grace_s is not None:
        overrides["worker_grace_s"] = grace_s
    if metrics_port is not None:
        overrides["worker_metrics_port"] = metrics_port
    if overrides:
        settings = settings.with_overrides(**overrides)
    run(preflight(settings))
    if settings.log_level.upper() != "DEBUG":
        # arq logs two INFO lines per job besides promptq's one; at hundreds of jobs/s they
        # cost more CPU than the rest of the job's bookkeeping.
        logging.getLogger("arq.worker").setLevel(logging.WARNING)
    use_fast_event_loop(settings)
    try:
        worker = create_worker(settings, burst=burst)
        worker.run()
    except PromptQError as exc:  # a bad config, a metrics port in use...
        fail(exc.message)


@app.command()
def demo(
    llm_url: Annotated[
        str | None,
        typer.Option(help="OpenAI-compatible base URL to use (as PROMPTQ_LLM_BASE_URL)."),
    ] = None,
    compare: Annotated[
        int,
        typer.Option(min=1, max=200, help="Questions to run one at a time, then concurrently."),
    ] = 8,
) -> None:
    """Run the whole pipeline once on embedded defaults and show the results."""
    from promptq.demo import run_demo

    settings = load_settings()
    logging.getLogger().setLevel(logging.WARNING)
    explicit = "llm_base_url" in settings.model_fields_set or llm_url is not None
    if llm_url is not None:
        settings = settings.with_overrides(llm_base_url=llm_url)
    raise typer.Exit(run(run_demo(settings, llm_explicit=explicit, compare_prompts=compare)))


@app.command()
def up(port: PortOption = None, log_format: LogFormatOption = None) -> None:
    """Start Redis (if needed), the API and a worker on embedded defaults, and keep serving."""
    from promptq.demo import serve_forever

    settings = load_settings(log_format)
    if port is not None:
        settings = settings.with_overrides(api_port=port)
    explicit = "llm_base_url" in settings.model_fields_set
    with suppress(KeyboardInterrupt), listening_on(settings.api_host, settings.api_port):
        raise typer.Exit(run(serve_forever(settings, llm_explicit=explicit)))


@app.command("fake-llm")
def fake_llm(
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8001,
    latency_ms: Annotated[float, typer.Option(min=0, help="Mean latency per request.")] = 0.0,
    jitter: Annotated[
        float, typer.Option(min=0, max=1, help="Latency spread, as a fraction.")
    ] = 0.0,
    context_window_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="Report at most this many prompt tokens (silent truncation)."),
    ] = None,
    chars_per_token: Annotated[
        float | None,
        typer.Option(help="Count prompt tokens as characters / this instead of words."),
    ] = None,
    exact_latency: Annotated[
        bool,
        typer.Option(
            help="Keep latencies to the microsecond (select(2): at most ~1,000 connections); "
            "off: epoll, which rounds each wait up to the next millisecond."
        ),
    ] = True,
) -> None:
    r"""Serve a fake OpenAI-compatible LLM, scriptable with `\[\[fake: ...]]` in prompts."""
    from promptq.testing.fake_llm import FakeLLMConfig, exact_timer_loop, serve

    load_settings()
    try:
        config = FakeLLMConfig(
            latency_ms=latency_ms,
            jitter=jitter,
            context_window_tokens=context_window_tokens,
            chars_per_token=chars_per_token,
        )
    except ValueError as exc:  # what the ranges above cannot catch: nan, a zero chars/token
        fail(f"{exc} (see --help)", 2)
    with (
        suppress(KeyboardInterrupt),
        listening_on(host, port),
        asyncio.Runner(loop_factory=exact_timer_loop if exact_latency else None) as runner,
    ):
        runner.run(serve(host, port, config))


# -- producers and readers ----------------------------------------------------------------------


@submit_app.command("prompt")
def submit_prompt(
    text: str,
    model: Annotated[str | None, typer.Option(help="Model (env PROMPTQ_DEFAULT_MODEL).")] = None,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    max_attempts: Annotated[int | None, typer.Option(min=1)] = None,
    deadline_s: Annotated[
        float | None,
        typer.Option(
            callback=seconds_above_zero,
            help="Fail the job if not done this many seconds from now.",
        ),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the result and print it.")] = False,
    timeout_s: TimeoutOption = 600.0,
) -> None:
    """Submit one chat prompt; prints the job id (or, with --wait, the result)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]
    body = {
        "kind": "prompt",
        "messages": messages,
        "model": model,
        "max_attempts": max_attempts,
        "deadline_s": deadline_s,
    }
    _submit_and_report([body], wait=wait, timeout_s=timeout_s)


@submit_app.command("summarize")
def submit_summarize(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="Files (.txt .md .html .pdf), folders (every such file inside) or quoted "
            "globs; one job per file."
        ),
    ],
    instructions: Annotated[str | None, typer.Option(help="How to summarize.")] = None,
    style: Annotated[str | None, typer.Option(help="bullets or paragraph.")] = None,
    target_words: Annotated[int | None, typer.Option(help="About how many words.")] = None,
    context_window: Annotated[
        int | None, typer.Option(help="The model's context window in tokens.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model (env PROMPTQ_DEFAULT_MODEL).")] = None,
    deadline_s: Annotated[
        float | None,
        typer.Option(
            callback=seconds_above_zero,
            help="Fail each job if not done this many seconds from now.",
        ),
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Show progress, wait for the summaries and print them.")
    ] = False,
    timeout_s: TimeoutOption = 3600.0,
) -> None:
    """Submit one summarize job per file; long documents are summarized chunk by chunk."""
    from promptq.cli_summarize import collect_paths, load_documents

    settings = load_settings()
    try:
        documents = load_documents(collect_paths(paths), max_bytes=settings.max_document_bytes)
    except InvalidRequest as exc:
        fail(exc.message, 2)
    options = {
        "instructions": instructions,
        "style": style,
        "target_words": target_words,
        "context_window": context_window,
        "model": model,
        "deadline_s": deadline_s,
    }
    bodies = [
        {
            "kind": "summarize",
            "document": document.text,
            "filename": Path(document.filename).name,
            "format": "markdown" if document.format == "markdown" else None,
            **options,
        }
        for document in documents
    ]
    labels = [document.filename for document in documents]
    # "Each file is a job, and a folder or glob becomes a batch" (so do several files).
    batch_name = " ".join(paths)[:255] if len(documents) > 1 or _names_many(paths) else None
    _submit_and_report(
        bodies,
        wait=wait,
        timeout_s=timeout_s,
        labels=labels,
        settings=settings,
        progress=True,
        batch_name=batch_name,
    )


def _names_many(paths: list[str]) -> bool:
    """True if an argument is a folder or a glob (which name a batch even of one file)."""
    return any(Path(p).is_dir() or (not Path(p).exists() and set("*?[") & set(p)) for p in paths)


def _submit_and_report(
    bodies: list[dict[str, Any]],
    *,
    wait: bool,
    timeout_s: float,
    labels: list[str] | None = None,
    settings: Settings | None = None,
    progress: bool = False,
    batch_name: str | None = None,
) -> None:
    settings = settings or load_settings()
    try:
        specs = [parse_job_request({k: v for k, v in b.items() if v is not None}) for b in bodies]
    except InvalidRequest as exc:
        fail(exc.message, 2)
    names = labels or [""] * len(specs)

    async def go() -> list[Job]:
        async with open_service(settings) as service:
            if batch_name is not None:
                jobs = await _submit_batch(service, specs, batch_name)
            else:
                jobs = [job for job, _ in await service.submit_all(specs)]
            if not wait:
                return jobs
            ids = [j.id for j in jobs]
            if progress:
                from promptq.cli_summarize import wait_with_progress

                return await wait_with_progress(
                    service, ids, names, timeout_s=timeout_s, console=err_console
                )
            return await _wait_all(service.store, ids, timeout_s)

    jobs = run(go())
    for label, job in zip(names, jobs, strict=True):
        if not wait:
            console.print(f"{job.id}  {label}".rstrip())
            continue
        if label:
            # Not a rule: a rule cuts long paths to the terminal's width.
            console.print(f"== {label}", style="bold", soft_wrap=True, highlight=False)
        _print_outcome(job)
    if wait and any(job.status != JobStatus.SUCCEEDED for job in jobs):
        raise typer.Exit(1)


async def _submit_batch(service: JobService, specs: list[Any], name: str) -> list[Job]:
    """Submit the requests as one batch; its jobs in order."""
    from promptq.batches import BatchService
    from promptq.cli_batch import item_specs

    batches = BatchService(service)
    created = await batches.create(item_specs(specs), owner_key_id=None, name=name)
    err_console.print(f"batch {created.batch.id}: {created.created} job(s)", highlight=False)
    ids = [job_id async for job_id in batches.job_ids(created.batch.id)]
    jobs = [await service.store.get_job(job_id) for job_id in ids]
    return [job for job in jobs if job is not None]


async def _wait_all(store: JobStore, job_ids: list[str], timeout_s: float) -> list[Job]:
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = [await store.get_job(job_id) for job_id in job_ids]
        done = [j for j in jobs if j is not None]
        if all(j.status in TERMINAL_STATUSES for j in done):
            return done
        if time.monotonic() > deadline:
            raise PromptQError(f"timed out after {timeout_s:g} s; check later with `promptq get`")
        await asyncio.sleep(0.2)


def _print_outcome(job: Job) -> None:
    if job.status == JobStatus.SUCCEEDED:
        console.print(job.result or "", highlight=False, soft_wrap=True)
    else:
        err_console.print(
            Text.assemble((job.status, "red"), f" after {job.attempts} attempt(s): {job.error}"),
            soft_wrap=True,
        )


@app.command()
def get(
    job_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job as JSON.")] = False,
    attempts: Annotated[bool, typer.Option(help="Include the attempt history.")] = False,
) -> None:
    """Show one job."""
    settings = load_settings()

    async def go() -> tuple[JobOut, list[AttemptOut]]:
        async with open_store(settings) as store:
            job = await store.get_job(job_id)
            if job is None:
                raise InvalidRequest(f"no job with id {job_id}")
            rows = await store.list_attempts(job_id) if attempts or as_json else []
            return JobOut.from_row(job), [AttemptOut.from_row(a) for a in rows]

    job, history = run(go())
    if as_json:
        data = job.model_dump(mode="json") | {
            "attempt_history": [a.model_dump(mode="json") for a in history]
        }
        print(json.dumps(data, indent=2))
        return
    table = Table(show_header=False, box=None)
    for key in ("id", "kind", "status", "model", "attempts", "max_attempts", "error"):
        table.add_row(key, _or_dash(getattr(job, key)))
    usage = job.usage
    if usage.prompt_tokens is not None or usage.completion_tokens is not None:
        tokens = f"{_or_dash(usage.prompt_tokens)} in / {_or_dash(usage.completion_tokens)} out"
        table.add_row("tokens", tokens)
    if job.cached_from is not None:  # a cache hit, or a job waiting for an identical one
        labels = {
            JobStatus.SUCCEEDED: "cached from",
            JobStatus.QUEUED: "waits for",
            JobStatus.FAILED: "refused like",
        }
        label = labels.get(JobStatus(job.status), "waited for")
        table.add_row(label, job.cached_from)
    table.add_row("created", str(job.created_at))
    table.add_row("finished", _or_dash(job.finished_at))
    console.print(table)
    for a in history:
        latency = f"{a.latency_ms}ms" if a.latency_ms is not None else "-"
        parts = [f"attempt {a.number}:", a.outcome, str(a.status_code or ""), latency, a.error]
        console.print("  " + " ".join(p for p in parts if p), soft_wrap=True)
    if job.result is not None:
        console.rule("result")
        console.print(job.result, highlight=False)


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


@app.command("list")
def list_jobs(
    status: Annotated[str | None, typer.Option(help="Only jobs in this status.")] = None,
    kind: Annotated[str | None, typer.Option(help="prompt or summarize.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
) -> None:
    """List recent jobs, newest first."""
    settings = load_settings()
    if status is not None and status not in {s.value for s in JobStatus}:
        fail(f"status must be one of {', '.join(JobStatus)}", 2)
    if kind is not None and kind not in {k.value for k in JobKind}:
        fail(f"kind must be one of {', '.join(JobKind)}", 2)

    async def go() -> list[Job]:
        async with open_store(settings) as store:
            return await store.list_jobs(status=status, kind=kind, limit=limit, with_input=False)

    print_columns(
        ["id", "kind", "status", "model", "attempts", "tokens", "created"],
        [
            [
                job.id,
                job.kind,
                job.status,
                job.model,
                str(job.attempts),
                f"{job.prompt_tokens or 0}/{job.completion_tokens or 0}",
                job.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            ]
            for job in run(go())
        ],
    )


@app.command()
def retry(
    job_ids: Annotated[
        list[str] | None, typer.Argument(help="Jobs to run again.", show_default=False)
    ] = None,
    status: Annotated[
        str | None,
        typer.Option(help="Instead of ids: every job in this status (failed/cancelled)."),
    ] = None,
    batch: Annotated[
        str | None,
        typer.Option(help="Instead of ids: the failed and cancelled jobs of this batch."),
    ] = None,
) -> None:
    """Run failed or cancelled jobs again, each with a fresh attempt budget.

    Their earlier attempts are kept; new attempts continue the numbering.
    """
    settings = load_settings()
    if bool(job_ids) == (status is not None or batch is not None):
        fail("give job ids or --status/--batch, not both or neither", 2)
    if status is not None and status not in RETRYABLE:
        fail(f"--status must be one of {', '.join(RETRYABLE)}", 2)

    async def go() -> tuple[list[str], list[str]]:
        async with open_service(settings) as service:
            if batch is not None:
                from promptq.cli_batch import retry_batch

                return await retry_batch(service, batch, status), []
            if status is None:
                ids = list(dict.fromkeys(job_ids or []))
                requeued = await service.retry(ids)
                return requeued, [i for i in ids if i not in set(requeued)]
            requeued = []
            after_id: str | None = None
            while page := await service.store.ids_with_status(
                status, after_id=after_id, limit=IDS_PER_STATEMENT
            ):
                requeued += await service.retry(page)
                after_id = page[-1]
            return requeued, []

    requeued, skipped = run(go())
    for job_id in requeued:
        console.print(f"re-queued {job_id}")
    for job_id in skipped:
        reason = f" {job_id}: no such failed or cancelled job"
        err_console.print(Text.assemble(("not re-queued", "yellow"), reason))
    console.print(f"{len(requeued)} job(s) re-queued")
    if skipped:
        raise typer.Exit(1)


def main() -> None:
    """Entry point of the `promptq` command."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
