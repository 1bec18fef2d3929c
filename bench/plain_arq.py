"""Plain arq for the benchmark: a trivial job that calls the LLM, on arq's default settings.

Run as `python -m bench.plain_arq --redis-url URL --queue NAME --llm-url URL --concurrency N`.
Only `max_jobs` (the concurrency) differs from arq's defaults (poll_delay 0.5 s, pickle, ...).
Logging is set up as the `arq` command sets it up.
"""

from __future__ import annotations

import argparse
import logging.config
from typing import Any

import aiohttp
import orjson
from arq import Worker
from arq.connections import RedisSettings
from arq.logs import default_log_config

#: The name of the job function, for `enqueue_job`.
CALL_LLM = "call_llm"
#: The model name sent to the fake LLM.
MODEL = "fake-small"


async def call_llm(ctx: dict[str, Any], content: str) -> int:
    """POST one chat completion; return the HTTP status."""
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}]})
    headers = {"Content-Type": "application/json"}
    async with ctx["http"].post(ctx["llm_url"], data=body, headers=headers) as response:
        response.raise_for_status()
        await response.read()
        return int(response.status)


def main() -> None:
    """Run the worker until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--llm-url", required=True, help="the /chat/completions URL")
    parser.add_argument("--concurrency", type=int, required=True)
    args = parser.parse_args()
    logging.config.dictConfig(default_log_config(verbose=False))

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["http"] = aiohttp.ClientSession()
        ctx["llm_url"] = args.llm_url

    async def shutdown(ctx: dict[str, Any]) -> None:
        await ctx["http"].close()

    Worker(
        functions=[call_llm],
        queue_name=args.queue,
        redis_settings=RedisSettings.from_dsn(args.redis_url),
        max_jobs=args.concurrency,
        on_startup=startup,
        on_shutdown=shutdown,
    ).run()


if __name__ == "__main__":
    main()
