"""Input limits: how much one request may carry, each refusal naming the setting to raise.

The HTTP body size is capped by aiohttp (`PROMPTQ_API_MAX_BODY_BYTES`), documents by
`promptq.documents.check_size`; this module caps what a job's messages may hold within that:
how many messages, and how many characters of text.
"""

from __future__ import annotations

from typing import Any

from promptq.errors import LimitExceeded
from promptq.settings import Settings


def text_chars(value: Any) -> int:
    """Characters in every string of a JSON-like value (keys included)."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return total


def check_messages(messages: list[dict[str, Any]], settings: Settings) -> None:
    """Refuse a job with more messages, or more message text, than the settings allow."""
    if len(messages) > settings.max_messages_per_job:
        raise LimitExceeded(
            f"a job may carry at most {settings.max_messages_per_job} messages; this one has "
            f"{len(messages)} (PROMPTQ_MAX_MESSAGES_PER_JOB)"
        )
    chars = text_chars(messages)
    if chars > settings.max_message_chars:
        raise LimitExceeded(
            f"a job's messages may hold at most {settings.max_message_chars} characters; these "
            f"hold {chars} (PROMPTQ_MAX_MESSAGE_CHARS; summarize long documents instead)"
        )
