"""Chat completion requests (`/v1/chat/completions`) as jobs: answered from the result cache,
or written at interactive priority and enqueued ahead of bulk work."""

from __future__ import annotations

import logging

from promptq.errors import ServiceUnavailable
from promptq.input_limits import check_messages
from promptq.models import Job, JobKind, Priority
from promptq.openai_schemas import ChatCompletionRequest
from promptq.service import JobService

logger = logging.getLogger(__name__)


class ChatService:
    """Turns a chat completion request into a job row (a cache hit is written finished)."""

    def __init__(self, service: JobService) -> None:
        self.service = service

    async def create(
        self,
        request: ChatCompletionRequest,
        *,
        owner_key_id: str | None,
        priority: int = Priority.INTERACTIVE,
    ) -> Job:
        """Write the job: already succeeded (with `cached_from`) on a cache hit, else queued.

        The caller enqueues a queued job (`enqueue`), after it has subscribed to its events.
        """
        settings = self.service.settings
        job_input = request.job_input()
        check_messages(job_input["messages"], settings)
        # Never a follower (promptq.single_flight): the caller is waiting on the line.
        found = await self.service.cache.lookup(
            request.model, job_input, request.cache, owner_key_id
        )
        job, _ = await self.service.store.create_job(
            kind=JobKind.PROMPT,
            model=request.model,
            input=job_input,
            max_attempts=request.max_attempts or settings.max_attempts,
            idempotency_key=None,
            owner_key_id=owner_key_id,
            deadline_s=request.deadline_s,
            request_hash=found.digest,
            answer_from=found.answer,
            priority=priority,
        )
        return job

    async def enqueue(self, job: Job) -> None:
        """Queue a job ahead of bulk work; with Redis down the reconciler queues it later."""
        try:
            await self.service.queue.enqueue(job.id, priority=job.priority)
        except ServiceUnavailable:
            logger.warning("job %s saved but not queued (Redis down); the reconciler will", job.id)
