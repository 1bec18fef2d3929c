"""End to end: the official `openai` package (sync client) against `promptq api` and
`promptq worker` processes and the fake LLM, exactly as a user's script would use them."""

from __future__ import annotations

import asyncio
import io
import json
import time

import openai
import pytest

from promptq.testing.fake_llm import expected_reply
from tests.e2e.conftest import Procs

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]


def user_script(base_url: str, api_key: str) -> dict[str, object]:
    """What a user's OpenAI code does; only base_url points at promptq."""
    client = openai.OpenAI(base_url=base_url, api_key=api_key)
    with client:
        answer = client.chat.completions.create(
            model="fake-small", messages=[{"role": "user", "content": "hello e2e"}]
        )
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="fake-small",
                messages=[{"role": "user", "content": "stream e2e"}],
                stream=True,
            )
            if chunk.choices
        )
        lines = [
            {
                "custom_id": f"c{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "fake-large", "messages": [{"role": "user", "content": f"b{i}"}]},
            }
            for i in range(3)
        ]
        data = "\n".join(json.dumps(line) for line in lines).encode()
        batch_file = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        batch = client.batches.create(
            input_file_id=batch_file.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        deadline = time.monotonic() + 30
        while batch.status != "completed" and time.monotonic() < deadline:
            time.sleep(0.2)
            batch = client.batches.retrieve(batch.id)
        assert batch.output_file_id is not None, batch
        output = [
            json.loads(line)
            for line in client.files.content(batch.output_file_id).text.splitlines()
        ]
    return {
        "answer": answer.choices[0].message.content,
        "streamed": streamed,
        "batch": {
            line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"]
            for line in output
        },
    }


async def test_the_openai_sdk_runs_unchanged_against_promptq_processes(
    procs: Procs, api_url: str, api_key: str
) -> None:
    procs.start("worker", "--concurrency", "4", name="worker")
    try:
        got = await asyncio.to_thread(user_script, f"{api_url}/v1", api_key)
    except Exception:
        print(procs.logs())
        raise
    assert got["answer"] == expected_reply("fake-small", [{"role": "user", "content": "hello e2e"}])
    assert got["streamed"] == expected_reply(
        "fake-small", [{"role": "user", "content": "stream e2e"}]
    )
    assert got["batch"] == {
        f"c{i}": expected_reply("fake-large", [{"role": "user", "content": f"b{i}"}])
        for i in range(3)
    }
