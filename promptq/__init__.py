"""promptq: a persistent job queue for LLM work (Redis/arq for delivery, SQL for results)."""

from __future__ import annotations

from promptq.client import PromptQClient
from promptq.errors import PromptQError
from promptq.settings import Settings
from promptq.sync_client import Client, SyncPromptQClient

__all__ = ["Client", "PromptQClient", "PromptQError", "Settings", "SyncPromptQClient"]
__version__ = "0.1.0"
