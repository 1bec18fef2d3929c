"""`promptq demo` and `promptq up`: the whole pipeline on one machine, on embedded defaults.

`local_stack` picks (or starts) Redis, the SQLite database, the model (`promptq.llm_choice`),
then runs the API and one worker in this process. The demo submits welcome messages for 20
made-up sign-ups and a few documents to summarize over HTTP, with a live progress bar, prints
a results table, then runs the same few questions one at a time (direct calls to the model)
and through promptq's workers, and prints the measured speed-up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import aiohttp
from aiohttp import web
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from promptq import demo_data, migrate
from promptq.client import TERMINAL, PromptQClient
from promptq.db import redact_url
from promptq.embedded import resolve_redis
from promptq.errors import LLMError
from promptq.llm_choice import LLMChoice, LLMKind, resolve_llm
from promptq.settings import Settings

logger = logging.getLogger(__name__)

#: How often the demo re-reads the jobs it is waiting for.
POLL_S = 0.1
#: Questions run one at a time and then through promptq, unless `--compare` says otherwise.
COMPARE_PROMPTS = 8
WELCOME_PARAMS = {"max_tokens": 60, "temperature": 0.7}
QUESTION_PARAMS = {"max_tokens": 40, "temperature": 0.2}
SUMMARY_PARAMS = {"max_tokens": 120, "temperature": 0.2}


class LocalStack(NamedTuple):
    """What `local_stack` started: its settings, the API's URL and the chosen model."""

    settings: Settings
    api_url: str
    llm: LLMChoice


@dataclass(frozen=True, slots=True)
class JobRow:
    """One line of the results table, read back through the API."""

    job_id: str
    label: str
    status: str
    attempts: int
    latency_ms: int
    prompt_tokens: int
    completion_tokens: int
    answer: str


@dataclass(frozen=True, slots=True)
class Comparison:
    """The same prompts run one at a time (direct calls) and through promptq's workers."""

    prompts: int
    concurrency: int
    sequential_s: float
    sequential_failures: int
    #: First job created to last job finished, from the jobs' own timestamps.
    concurrent_s: float
    job_ids: list[str]

    @property
    def speedup(self) -> float:
        """How many times faster promptq ran them."""
        return self.sequential_s / max(self.concurrent_s, 1e-9)


@dataclass(frozen=True, slots=True)
class DemoReport:
    """What the demo did, as it printed it."""

    llm: LLMKind
    model: str
    rows: list[JobRow]
    makespan_s: float
    comparison: Comparison

    @property
    def ok(self) -> bool:
        """Every job succeeded."""
        return all(row.status == "succeeded" for row in self.rows)


@asynccontextmanager
async def local_stack(
    settings: Settings,
    *,
    llm_explicit: bool,
    api_port: int = 0,
    console: Console | None = None,
) -> AsyncIterator[LocalStack]:
    """Redis, database, model, API and one worker in this process, all stopped on exit."""
    from api.app import create_app
    from worker.app import create_worker

    console = console or Console()
    async with AsyncExitStack() as stack:
        settings = await stack.enter_async_context(resolve_redis(settings))
        console.print(f"redis: {escape(redact_url(settings.redis_url))}")
        console.print(f"database: {escape(redact_url(settings.resolved_database_url))}")
        await migrate.upgrade_async(settings)
        console.print("model: looking for one (PROMPTQ_LLM_BASE_URL, Ollama, bundled) ...")
        llm = await stack.enter_async_context(
            resolve_llm(settings, explicit=llm_explicit, allow_bundled=settings.bundled_llm)
        )
        settings = llm.settings
        style = "bold" if llm.kind in (LLMKind.CONFIGURED, LLMKind.OLLAMA) else "bold yellow"
        console.print(f"model: [{style}]{escape(llm.summary)}[/]")
        if llm.notice:
            console.print(f"[yellow]{escape(llm.notice)}[/]")
        runner = web.AppRunner(
            create_app(settings), access_log=None, shutdown_timeout=settings.api_shutdown_grace_s
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, settings.api_host, api_port)
        await site.start()
        api_url = f"http://{settings.api_host}:{runner.addresses[0][1]}"
        console.print(f"API: {escape(api_url)}  (try: curl {escape(api_url)}/api/jobs?limit=5)")

        worker = create_worker(settings, handle_signals=False)
        worker_task = asyncio.create_task(worker.async_run())

        async def stop_worker() -> None:
            await worker.close()
            worker_task.cancel()
            await asyncio.gather(worker_task, return_exceptions=True)

        stack.push_async_callback(stop_worker)
        console.print(f"worker: {settings.worker_concurrency} jobs at a time")
        yield LocalStack(settings, api_url, llm)


async def run_demo(
    settings: Settings,
    *,
    llm_explicit: bool,
    compare_prompts: int = COMPARE_PROMPTS,
    console: Console | None = None,
) -> int:
    """Run the demo; returns the process exit code."""
    report = await demo_report(
        settings, llm_explicit=llm_explicit, compare_prompts=compare_prompts, console=console
    )
    return 0 if report.ok else 1


async def demo_report(
    settings: Settings,
    *,
    llm_explicit: bool,
    compare_prompts: int = COMPARE_PROMPTS,
    console: Console | None = None,
) -> DemoReport:
    """Run the demo, print what happened, and return it."""
    console = console or Console()
    # The demo's API listens on an ephemeral 127.0.0.1 port for its own client: no keys needed.
    demo_settings = settings.with_overrides(auth_disabled=True, api_host="127.0.0.1")
    async with (
        local_stack(demo_settings, llm_explicit=llm_explicit, console=console) as stack,
        PromptQClient(stack.api_url) as client,
    ):
        rows, makespan_s = await _welcome_and_summaries(client, console)
        _print_table(console, rows)
        console.print(
            f"{len(rows)} jobs in {makespan_s:.2f} s, "
            f"{stack.settings.worker_concurrency} at a time."
        )
        comparison = await _compare(client, stack.settings, compare_prompts, console)
        _print_comparison(console, comparison, stack.llm.kind)
        model = stack.settings.default_model
        report = DemoReport(stack.llm.kind, model, rows, makespan_s, comparison)
        done = "All jobs succeeded." if report.ok else "[red]Some jobs failed[/red]: see the table."
        database = escape(redact_url(stack.settings.resolved_database_url))
        console.print(
            f"{done} Every job, attempt and token count is in the database "
            f"({database}): try `promptq list`."
        )
        return report


async def serve_forever(settings: Settings, *, llm_explicit: bool) -> int:
    """`promptq up`: the same stack as the demo, serving until Ctrl-C."""
    async with local_stack(settings, llm_explicit=llm_explicit, api_port=settings.api_port):
        Console().print("promptq is up; Ctrl-C stops it.")
        await asyncio.Event().wait()
    return 0


def _progress(console: Console) -> Progress:
    columns = (
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    return Progress(*columns, console=console)


async def _welcome_and_summaries(
    client: PromptQClient, console: Console
) -> tuple[list[JobRow], float]:
    users = demo_data.sign_ups()
    docs = demo_data.documents()
    console.print(
        f"\nSubmitting {len(users)} welcome messages and {len(docs)} documents to summarize ..."
    )
    started = time.monotonic()
    with _progress(console) as progress:
        welcome_bar = progress.add_task("welcome messages", total=len(users))
        summary_bar = progress.add_task("document summaries", total=len(docs))
        labels: dict[str, str] = {}
        bars: dict[str, Any] = {}
        for user in users:
            job = await client.submit_prompt(user.messages(), params=WELCOME_PARAMS)
            labels[job["id"]] = f"welcome {user.name} ({user.product})"
            bars[job["id"]] = welcome_bar
        for name, text in docs.items():
            job = await client.submit_summarize(
                text, instructions=demo_data.SUMMARY_INSTRUCTIONS, params=SUMMARY_PARAMS
            )
            labels[job["id"]] = f"summarize {name}"
            bars[job["id"]] = summary_bar
        jobs = await _wait_all(client, labels, lambda job_id: progress.advance(bars[job_id]))
    makespan_s = time.monotonic() - started
    rows = [await _row(client, jobs[job_id], label) for job_id, label in labels.items()]
    return rows, makespan_s


async def _wait_all(
    client: PromptQClient, job_ids: Iterable[str], on_done: Any
) -> dict[str, dict[str, Any]]:
    """Poll until every job is terminal; `on_done(job_id)` as each one finishes."""
    pending = list(job_ids)
    done: dict[str, dict[str, Any]] = {}
    while pending:
        jobs = await asyncio.gather(*(client.get(job_id) for job_id in pending))
        for job in jobs:
            if job["status"] in TERMINAL:
                done[job["id"]] = job
                on_done(job["id"])
        pending = [job_id for job_id in pending if job_id not in done]
        if pending:
            await asyncio.sleep(POLL_S)
    return done


async def _row(client: PromptQClient, job: dict[str, Any], label: str) -> JobRow:
    attempts = await client.attempts(job["id"])
    usage = job["usage"]
    return JobRow(
        job_id=job["id"],
        label=label,
        status=job["status"],
        attempts=job["attempts"],
        latency_ms=sum(a["latency_ms"] or 0 for a in attempts),
        prompt_tokens=usage["prompt_tokens"] or 0,
        completion_tokens=usage["completion_tokens"] or 0,
        answer=" ".join((job["result"] or job["error"] or "").split()),
    )


def _print_table(console: Console, rows: list[JobRow]) -> None:
    table = Table("job", "status", "attempts", "latency", "tokens in/out")
    # The answer gets what the other columns leave (rich would squeeze every column alike,
    # down to nothing, on an 80-column terminal or a pipe).
    answer_width = max(10, min(60, console.width - 80))
    table.add_column("answer", no_wrap=True, overflow="ellipsis", max_width=answer_width)
    for row in rows:
        # Text, not markup: answers are the model's, labels carry made-up names.
        status = Text(row.status, style="" if row.status == "succeeded" else "red")
        table.add_row(
            Text(row.label),
            status,
            str(row.attempts),
            f"{row.latency_ms} ms",
            f"{row.prompt_tokens}/{row.completion_tokens}",
            Text(row.answer),
        )
    console.print(table)


async def _compare(
    client: PromptQClient, settings: Settings, count: int, console: Console
) -> Comparison:
    from worker.llm import LLMClient

    prompts = demo_data.comparison_prompts(count)
    console.print(
        f"\nThe same {count} questions, first one at a time (direct calls to the model, no "
        f"queue), then through promptq ({settings.worker_concurrency} at a time):"
    )
    failures = 0
    with _progress(console) as progress:
        one_bar = progress.add_task("one at a time", total=count)
        many_bar = progress.add_task("through promptq", total=count, start=False)
        api_key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else None
        async with aiohttp.ClientSession() as session:
            llm = LLMClient(
                session,
                base_url=settings.llm_base_url,
                api_key=api_key,
                timeout_s=settings.llm_timeout_s,
            )
            started = time.monotonic()
            for messages in prompts:
                try:
                    await llm.chat(settings.default_model, messages, QUESTION_PARAMS)
                except LLMError:
                    failures += 1
                progress.advance(one_bar)
            sequential_s = time.monotonic() - started

        progress.start_task(many_bar)
        job_ids = [
            (await client.submit_prompt(messages, params=QUESTION_PARAMS))["id"]
            for messages in prompts
        ]
        jobs = await _wait_all(client, job_ids, lambda _: progress.advance(many_bar))
    created = min(_when(job["created_at"]) for job in jobs.values())
    finished = max(_when(job["finished_at"] or job["created_at"]) for job in jobs.values())
    return Comparison(
        prompts=count,
        concurrency=settings.worker_concurrency,
        sequential_s=sequential_s,
        sequential_failures=failures,
        concurrent_s=(finished - created).total_seconds(),
        job_ids=job_ids,
    )


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _print_comparison(console: Console, comparison: Comparison, kind: LLMKind) -> None:
    failures = comparison.sequential_failures
    failed = f" ({failures} calls failed)" if failures else ""
    console.print(
        f"one at a time: {comparison.sequential_s:.2f} s{failed}; through promptq "
        f"({comparison.concurrency} at a time): {comparison.concurrent_s:.2f} s; "
        f"speed-up [bold]{comparison.speedup:.1f}x[/bold]"
    )
    if kind is LLMKind.BUNDLED:
        console.print(
            "[yellow]The bundled llama.cpp server computes one request at a time, so a speed-up "
            "against it does not come from overlapping calls: its CPU threads slow down and "
            "speed up with the machine's load, so read these two times with care. Against "
            "Ollama (OLLAMA_NUM_PARALLEL) or a hosted API, requests overlap and the speed-up "
            "grows with the concurrency.[/]"
        )
