"""`promptq demo`: the whole pipeline on one machine, end to end, with a live progress bar.

It starts the API and a worker in this process, submits the classic welcome-message batch and
two documents to summarize over HTTP, waits for every result, then prints what happened.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from promptq import migrate
from promptq.client import TERMINAL, PromptQClient
from promptq.db import redact_url
from promptq.embedded import resolve_redis
from promptq.settings import Settings

logger = logging.getLogger(__name__)

NAMES = [
    "Alice",
    "Bob",
    "Charlie",
    "David",
    "Emma",
    "Frank",
    "Grace",
    "Hannah",
    "Ian",
    "Jessica",
    "Kevin",
    "Linda",
    "Michael",
    "Nancy",
    "Olivia",
    "Peter",
    "Quincy",
    "Rachel",
    "Samuel",
    "Tiffany",
]

DOCUMENTS = {
    "lighthouse.txt": (
        "The lighthouse on the northern cape was built in 1871 from granite quarried two miles "
        "inland. For ninety years a keeper and his family lived in the cottage at its foot, "
        "trimming the wick every four hours and logging every passing ship. When the light was "
        "automated in 1961 the cottage became a small museum. Its logbooks record three "
        "shipwrecks, forty-one storms strong enough to break the lantern glass, and one winter "
        "when the keeper's daughter kept the light burning alone for eleven days."
    ),
    "sourdough.txt": (
        "A sourdough starter is a culture of wild yeast and lactic acid bacteria living in a "
        "paste of flour and water. Fed daily, it doubles within four to eight hours at room "
        "temperature. The yeast makes the bread rise; the bacteria make it sour and help it "
        "keep. Bakers judge a starter ready when it smells pleasantly acidic, is full of "
        "bubbles, and a spoonful floats in water. A neglected starter can usually be revived "
        "with two or three feedings, which is why some families have kept theirs for decades."
    ),
}

#: Latency of the built-in fake model, so the concurrency speed-up is visible.
FAKE_LATENCY_MS = 400.0

console = Console()


async def _answers(url: str) -> bool:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.5)) as session,
            session.get(url) as response,
        ):
            return response.status < 500
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


@asynccontextmanager
async def _llm(settings: Settings, explicit: bool) -> AsyncIterator[Settings]:
    """The configured LLM, else a local Ollama, else the built-in fake model (said loudly)."""
    if explicit:
        console.print(f"LLM: [bold]{settings.llm_base_url}[/bold] (PROMPTQ_LLM_BASE_URL)")
        yield settings
        return
    if await _answers(f"{settings.llm_base_url}/models"):
        console.print(f"LLM: Ollama at [bold]{settings.llm_base_url}[/bold]")
        yield settings
        return
    from promptq.testing.fake_llm import FakeLLM, FakeLLMConfig

    async with FakeLLM(FakeLLMConfig(latency_ms=FAKE_LATENCY_MS, jitter=0.3)) as fake:
        console.print(
            "[yellow]LLM: no PROMPTQ_LLM_BASE_URL and no Ollama on localhost:11434, so this demo "
            f"uses promptq's built-in FAKE model at {fake.base_url}: its answers are canned.[/]\n"
            "[yellow]For real answers: `ollama serve` + `ollama pull llama3.2`, or set "
            "PROMPTQ_LLM_BASE_URL / PROMPTQ_LLM_API_KEY / PROMPTQ_DEFAULT_MODEL.[/]"
        )
        yield settings.with_overrides(llm_base_url=fake.base_url)


@asynccontextmanager
async def local_stack(
    settings: Settings, *, llm_explicit: bool, api_port: int = 0
) -> AsyncIterator[tuple[Settings, str]]:
    """Redis, database, LLM, API and one worker in this process; yields (settings, api_url)."""
    from api.app import create_app
    from worker.app import create_worker

    async with AsyncExitStack() as stack:
        settings = await stack.enter_async_context(resolve_redis(settings))
        console.print(f"database: {redact_url(settings.resolved_database_url)}")
        await migrate.upgrade_async(settings)
        settings = await stack.enter_async_context(_llm(settings, llm_explicit))
        runner = web.AppRunner(create_app(settings), access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, settings.api_host, api_port)
        await site.start()
        api_url = f"http://{settings.api_host}:{runner.addresses[0][1]}"
        console.print(f"API: {api_url}  (try: curl {api_url}/api/jobs?limit=5)")

        worker = create_worker(settings, handle_signals=False)
        worker_task = asyncio.create_task(worker.async_run())

        async def stop_worker() -> None:
            await worker.close()
            worker_task.cancel()
            await asyncio.gather(worker_task, return_exceptions=True)

        stack.push_async_callback(stop_worker)
        yield settings, api_url


async def run_demo(settings: Settings, *, llm_explicit: bool) -> int:
    """Run the demo; returns the process exit code."""
    # The demo's API listens on an ephemeral 127.0.0.1 port for its own client: no keys needed.
    demo_settings = settings.with_overrides(auth_disabled=True, api_host="127.0.0.1")
    async with (
        local_stack(demo_settings, llm_explicit=llm_explicit) as (_, api_url),
        PromptQClient(api_url) as client,
    ):
        return await _submit_and_watch(client)


async def serve_forever(settings: Settings, *, llm_explicit: bool) -> int:
    """`promptq up`: the same stack as the demo, serving until Ctrl-C."""
    async with local_stack(settings, llm_explicit=llm_explicit, api_port=settings.api_port):
        console.print("promptq is up; Ctrl-C stops it.")
        await asyncio.Event().wait()
    return 0


async def _submit_and_watch(client: PromptQClient) -> int:
    started = time.monotonic()
    labels: dict[str, str] = {}
    for name in NAMES:
        job = await client.submit_prompt(
            [
                {"role": "system", "content": "You write one short, warm sentence."},
                {"role": "user", "content": f"Write a personalized welcome message for {name}."},
            ],
            params={"max_tokens": 60},
        )
        labels[job["id"]] = f"welcome {name}"
    for filename, text in DOCUMENTS.items():
        job = await client.submit_summarize(text, instructions="Summarize in two sentences.")
        labels[job["id"]] = f"summarize {filename}"

    done: dict[str, dict[str, Any]] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("running jobs", total=len(labels))
        while len(done) < len(labels):
            for job_id in labels.keys() - done.keys():
                job = await client.get(job_id)
                if job["status"] in TERMINAL:
                    done[job_id] = job
            progress.update(bar, completed=len(done))
            if len(done) < len(labels):
                await asyncio.sleep(0.1)
    makespan_s = time.monotonic() - started

    table = Table("job", "status", "attempts", "latency", "tokens in/out")
    table.add_column("answer", no_wrap=True, overflow="ellipsis", max_width=60)
    model_time_s = 0.0
    for job_id, label in labels.items():
        job = done[job_id]
        attempts = await client.attempts(job_id)
        latency_ms = sum(a["latency_ms"] or 0 for a in attempts)
        model_time_s += latency_ms / 1000
        usage = job["usage"]
        answer = (job["result"] or job["error"] or "").replace("\n", " ")
        table.add_row(
            label,
            job["status"],
            str(job["attempts"]),
            f"{latency_ms} ms",
            f"{usage['prompt_tokens'] or 0}/{usage['completion_tokens'] or 0}",
            answer,
        )
    console.print(table)
    console.print(
        f"{len(done)} jobs in {makespan_s:.2f} s; calling the model one at a time would take "
        f"about {model_time_s:.2f} s, a [bold]{model_time_s / max(makespan_s, 1e-9):.1f}x[/bold] "
        "speed-up. Every result is in the database: try `promptq list`."
    )
    return 0 if all(j["status"] == "succeeded" for j in done.values()) else 1
