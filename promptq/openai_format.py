"""promptq jobs as OpenAI objects: the `chat.completion` a finished prompt job answers with,
and the chunks of a streamed one."""

from __future__ import annotations

from typing import Any

from promptq.models import Job

#: `finish_reason` when the backend did not report one.
DEFAULT_FINISH_REASON = "stop"


def completion_id(job_id: str) -> str:
    """The `chat.completion` id of a job: its promptq id, recognisably prefixed."""
    return f"chatcmpl-{job_id}"


def usage(job: Job) -> dict[str, int]:
    """OpenAI's usage object from a job's token counts (0 where the backend gave none)."""
    prompt = job.prompt_tokens or 0
    completion = job.completion_tokens or 0
    total = prompt + completion
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


def chat_completion(job: Job, model: str) -> dict[str, Any]:
    """The `chat.completion` object of a succeeded prompt job; `model` answered it."""
    message = {"role": "assistant", "content": job.result, "refusal": None}
    return {
        "id": completion_id(job.id),
        "object": "chat.completion",
        "created": int(job.created_at.timestamp()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": job.finish_reason or DEFAULT_FINISH_REASON,
            }
        ],
        "usage": usage(job),
        "system_fingerprint": None,
    }


def chunk(job: Job, model: str, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    """One `chat.completion.chunk` of a streamed answer."""
    return {
        "id": completion_id(job.id),
        "object": "chat.completion.chunk",
        "created": int(job.created_at.timestamp()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(job: Job, model: str) -> dict[str, Any]:
    """The last chunk of a stream that asked for usage (`stream_options.include_usage`)."""
    return chunk(job, model, {}, None) | {"choices": [], "usage": usage(job)}
