"""promptq: a persistent job queue for LLM work (Redis/arq for delivery, SQL for results)."""

from __future__ import annotations

from promptq.client import PromptQClient
from promptq.errors import PromptQError
from promptq.settings import Settings

__all__ = ["PromptQClient", "PromptQError", "Settings"]
__version__ = "0.1.0"
