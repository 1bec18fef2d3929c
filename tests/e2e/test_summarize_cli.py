"""`promptq submit summarize` as users run it: a real CLI process and a real worker process.

Given a folder of .txt, .md, .html and .pdf files, when it is submitted with --wait, then every
file becomes a job, progress is shown, and every summary is printed; given bad input, the CLI
says what is wrong, exits 2, and creates nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from promptq.service import JobService
from promptq.testing.fake_llm import FakeLLM
from tests.e2e.conftest import Procs
from tests.summaries import generate_document, minimal_pdf

pytestmark = pytest.mark.e2e


async def test_a_folder_is_summarized_file_by_file_with_progress(
    procs: Procs, fake_llm: FakeLLM, service: JobService, tmp_path: Path
) -> None:
    # Given a folder with one file of each kind (one of them long), and a file promptq ignores
    fake_llm.config.chars_per_token = 4.0
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a-notes.txt").write_text("The pier was rebuilt in 1998.\n")
    (folder / "b-long.md").write_text("# Log\n\n" + generate_document(4_000, seed=8))
    (folder / "sub" / "c-page.html").write_text("<p>Ferries run <i>hourly</i>.</p>")
    (folder / "sub" / "d-scan.pdf").write_bytes(minimal_pdf(["Tolls rose 3% in 2023."]))
    (folder / "photo.png").write_bytes(b"\x89PNG")
    procs.start("worker", "--concurrency", "4", name="worker")

    # When the folder is submitted and waited for
    result = await procs.run(
        "submit",
        "summarize",
        str(folder),
        "--context-window",
        "1024",
        "--deadline-s",
        "600",
        "--wait",
        timeout_s=120,
    )

    # Then all four files were summarized, each printed under its name, with progress shown
    assert result.returncode == 0, result.stdout + result.stderr + procs.logs()
    names = ["a-notes.txt", "b-long.md", "c-page.html", "d-scan.pdf"]
    positions = [result.stdout.find(name) for name in names]
    assert -1 not in positions and positions == sorted(positions), result.stdout
    lines = result.stdout.splitlines()
    assert sum(line.startswith("[fake-small] reply") for line in lines) == 4
    assert "all files" in result.stderr and "succeeded" in result.stderr
    jobs = await service.store.list_jobs(kind="summarize")
    assert len(jobs) == 4 and all(j.status == "succeeded" for j in jobs)
    assert all(j.deadline_s == 600 and j.deadline_at is not None for j in jobs)
    by_name = {j.input["filename"]: j for j in jobs}
    assert set(by_name) == set(names)
    assert by_name["b-long.md"].input["format"] == "markdown"
    assert by_name["d-scan.pdf"].input["document"] == "Tolls rose 3% in 2023."
    long_progress = (await service.checkpoints.progress([by_name["b-long.md"].id])).popitem()[1]
    assert long_progress.level >= 1  # it was long enough to need map and reduce calls


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_bad_files_stop_the_cli_before_anything_is_created(
    procs: Procs, service: JobService, tmp_path: Path
) -> None:
    good = tmp_path / "good.txt"
    good.write_text("fine")
    (tmp_path / "memo.docx").write_bytes(b"PK\x03\x04")
    (tmp_path / "big.txt").write_text("x" * 2000)

    unsupported = await procs.run("submit", "summarize", str(good), str(tmp_path / "memo.docx"))
    assert unsupported.returncode == 2
    assert "not a supported document" in unsupported.stderr

    procs.settings = procs.settings.with_overrides(max_document_bytes=1024)
    too_big = await procs.run("submit", "summarize", str(good), str(tmp_path / "big.txt"))
    assert too_big.returncode == 2
    assert "2000 bytes; the limit is 1024" in too_big.stderr

    no_match = await procs.run("submit", "summarize", str(tmp_path / "*.pdf"))
    assert no_match.returncode == 2 and "matches no" in no_match.stderr
    for result in (unsupported, too_big, no_match):
        assert "Traceback" not in result.stderr
    assert await service.store.list_jobs() == []
