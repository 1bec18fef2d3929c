"""`promptq submit summarize`: which files to read, reading them, and live progress bars."""

from __future__ import annotations

import asyncio
import glob
import logging
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import TaskID

from promptq.cli_progress import progress_bars
from promptq.documents import Document, check_size, read_document, supported
from promptq.errors import InvalidRequest, PromptQError
from promptq.models import TERMINAL_STATUSES, Job, JobStatus
from promptq.service import JobService

logger = logging.getLogger(__name__)

#: How often --wait re-reads the jobs.
POLL_S = 0.2
#: Longest label beside a progress bar; longer paths keep their end (the file name).
LABEL_CHARS = 36
_GLOB_CHARS = frozenset("*?[")


def collect_paths(arguments: list[str]) -> list[Path]:
    """The files named by the arguments, in order: a file as is, every supported file under a
    folder (recursively, sorted), the files a quoted glob matches. Duplicates are dropped."""
    found: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and supported(p.name))
            if not inside:
                raise InvalidRequest(f"{argument}: no .txt, .md, .html or .pdf files in it")
            found.extend(inside)
        elif path.exists():
            found.append(path)
        elif _GLOB_CHARS & set(argument):
            matches = sorted(Path(m) for m in glob.glob(argument, recursive=True))
            files = [m for m in matches if m.is_file() and supported(m.name)]
            if not files:
                raise InvalidRequest(f"{argument}: matches no .txt, .md, .html or .pdf files")
            found.extend(files)
        else:
            raise InvalidRequest(f"cannot read {argument}: no such file or folder")
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def load_documents(paths: list[Path], *, max_bytes: int) -> list[Document]:
    """Read and extract every file first, so one bad file stops the command before any job
    is created."""
    documents = []
    for path in paths:
        try:
            check_size(str(path), path.stat().st_size, max_bytes)
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidRequest(f"cannot read {path}: {exc.strerror or exc}") from None
        documents.append(read_document(str(path), data, max_bytes=max_bytes))
    return documents


async def wait_with_progress(
    service: JobService,
    job_ids: list[str],
    labels: list[str],
    *,
    timeout_s: float,
    console: Console,
) -> list[Job]:
    """Show a bar per job (chunks done at its current level) and one overall, until every job
    has finished; returns the finished jobs in order."""
    deadline = time.monotonic() + timeout_s
    with progress_bars(console) as progress:
        overall = progress.add_task("all files", total=len(job_ids), state="")
        bars: dict[str, TaskID] = {
            # A progress bar's description is Rich markup: a file name is not.
            job_id: progress.add_task(escape(_short(label)), total=None, state="queued")
            for job_id, label in zip(job_ids, labels, strict=True)
        }
        while True:
            states = await service.store.get_states(job_ids)
            chunks = await service.checkpoints.progress(job_ids)
            finished = 0
            for job_id, bar in bars.items():
                state, step = states.get(job_id), chunks[job_id]
                status = state.status if state else "missing"
                terminal = state is not None and JobStatus(status) in TERMINAL_STATUSES
                finished += terminal
                where = f"level {step.level}" if step.chunks_total else ""
                progress.update(
                    bar,
                    total=step.chunks_total or None,
                    completed=step.chunks_done,
                    state=f"{status} {where}".strip(),
                )
            progress.update(overall, completed=finished)
            if finished == len(job_ids):
                break
            if time.monotonic() > deadline:
                raise PromptQError(
                    f"timed out after {timeout_s:g} s; check later with `promptq get`"
                )
            await asyncio.sleep(POLL_S)
    jobs = [await service.store.get_job(job_id) for job_id in job_ids]
    return [job for job in jobs if job is not None]


def _short(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else "…" + label[-(LABEL_CHARS - 1) :]
