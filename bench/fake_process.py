"""The benchmark's fake LLM: `promptq fake-llm` as a process of its own.

In its own process the fake shares no event loop with the load generator or the baseline's
client, and its exact-latency loop (promptq.testing.fake_llm.exact_timer_loop) answers each
call when its injected latency is up, not up to a millisecond later. The benchmark configures
it, clears it and reads its counters over the fake's `/_fake/*` endpoints.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

#: How often `wait_for_requests` reads the fake's counters.
POLL_S = 0.002


class FakeLLMProcess:
    """`promptq fake-llm` (the `promptq` executable) on `port`, with async access to its
    config and counters."""

    def __init__(self, promptq: str, port: int, log_path: Path) -> None:
        self.promptq, self.port, self.log_path = promptq, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = self.url + "/v1"
        self._proc: asyncio.subprocess.Process | None = None
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> FakeLLMProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTQ_")}
        with self.log_path.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                self.promptq, "fake-llm", "--port", str(self.port), stdout=log, stderr=log, env=env
            )
        self._http = aiohttp.ClientSession()
        deadline = time.monotonic() + 30
        while True:
            try:
                async with self._http.get(self.base_url + "/models") as response:
                    if response.status == 200:
                        return self
            except aiohttp.ClientError:
                pass
            if self._proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fake LLM did not start; see {self.log_path}")
            await asyncio.sleep(0.05)

    async def __aexit__(self, *exc_info: object) -> None:
        if self._http is not None:
            await self._http.close()
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            await self._proc.wait()

    async def prepare(self, *, latency_ms: float, jitter: float = 0.0, seed: int = 1) -> None:
        """Set the latency (reseeding the RNG, so every system gets the same draws) and clear
        the counters."""
        config = {"latency_ms": latency_ms, "jitter": jitter, "seed": seed}
        await self._post("/_fake/config", config)
        await self._post("/_fake/reset", {})

    async def stats(self) -> dict[str, Any]:
        """The fake's counters (`FakeLLMStats.to_dict()`)."""
        assert self._http is not None
        async with self._http.get(self.url + "/_fake/stats") as response:
            response.raise_for_status()
            stats: dict[str, Any] = orjson.loads(await response.read())
            return stats

    async def wait_for_requests(self, n: int, timeout_s: float) -> None:
        """Wait until at least `n` chat requests have arrived since the last `prepare`."""
        deadline = time.monotonic() + timeout_s
        while (await self.stats())["total_requests"] < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the fake LLM did not see {n} requests in {timeout_s} s")
            await asyncio.sleep(POLL_S)

    async def _post(self, path: str, body: dict[str, Any]) -> None:
        assert self._http is not None
        async with self._http.post(self.url + path, data=orjson.dumps(body)) as response:
            if response.status != 200:
                raise RuntimeError(f"fake LLM {path}: {response.status} {await response.text()}")
