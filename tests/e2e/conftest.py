"""Run the real `promptq` CLI as subprocesses against this test's database and Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from promptq.settings import Settings

PROMPTQ = str(Path(sys.executable).with_name("promptq"))


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_env(settings: Settings) -> dict[str, str]:
    """The PROMPTQ_* environment equivalent to `settings` (defaults are left unset)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTQ_")}
    for name, field_info in type(settings).model_fields.items():
        value = getattr(settings, name)
        if value is None or value == field_info.default:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"PROMPTQ_{name.upper()}"] = str(value)
    return env


@dataclass
class Procs:
    """The subprocesses a test started, with their log files; all are stopped at the end."""

    settings: Settings
    tmp: Path
    running: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def start(self, *args: str, name: str) -> subprocess.Popen[bytes]:
        """Start `promptq ARGS` in the background."""
        log = self.tmp / f"{name}.log"
        proc = subprocess.Popen(
            [PROMPTQ, *args],
            env=settings_env(self.settings),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            cwd=self.tmp,
        )
        self.running.append((proc, log))
        return proc

    async def run(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `promptq ARGS` to completion, off the event loop (the fake LLM lives on it)."""
        return await asyncio.to_thread(self.run_sync, *args, timeout_s=timeout_s)

    def run_sync(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `promptq ARGS` to completion."""
        return subprocess.run(
            [PROMPTQ, *args],
            env=settings_env(self.settings),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=self.tmp,
        )

    def stop_all(self) -> None:
        """SIGTERM, then SIGKILL whatever is left."""
        for proc, _ in self.running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc, _ in self.running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def logs(self, max_chars: int | None = 4000) -> str:
        """Every log (the last `max_chars` of each; None: all of it), for failure messages."""
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-(max_chars or 0) :]}"
            for _, log in self.running
        )


@pytest.fixture
def procs(settings: Settings, tmp_path: Path) -> Iterator[Procs]:
    """Subprocess helper; prints the logs when a test fails."""
    p = Procs(settings.with_overrides(api_port=free_port(), llm_timeout_s=1.0), tmp_path)
    yield p
    p.stop_all()


async def wait_healthy(base_url: str, proc: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    """Wait until the API answers /healthz with 200."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the API exited with {proc.returncode}")
            try:
                async with session.get(f"{base_url}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError("the API did not become healthy")


@pytest.fixture
async def api_url(procs: Procs) -> AsyncIterator[str]:
    """A running `promptq api` subprocess."""
    proc = procs.start("api", "--port", str(procs.settings.api_port), name="api")
    url = f"http://127.0.0.1:{procs.settings.api_port}"
    try:
        await wait_healthy(url, proc)
    except Exception:
        print(procs.logs())
        raise
    yield url


@pytest.fixture
def api_key(procs: Procs) -> str:
    """A fresh (non-admin) API key, made with `promptq keys create`."""
    created = procs.run_sync("keys", "create", "--name", "e2e")
    assert created.returncode == 0, created.stderr
    return created.stdout.strip()
