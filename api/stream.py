"""`GET /api/jobs/{id}/stream`: a job's life as server-sent events.

Events, each `data` a JSON object:

* `status`: `{"status", "attempts", "max_attempts", "error", "error_code"}` on every change; the
  last event of the stream is the terminal one, which also carries `result`.
* `progress` (summarize jobs): `{"chunks_done", "chunks_total", "level"}` on every change.
* `token`: `{"text"}`, a piece of the final summary as the model writes it (when the worker
  streams it). Tokens of an attempt that then fails are followed by its `retrying` status.
* `revoked`: `{}`, the stream's last event when its API key was revoked while it was open (the
  key is checked again as the stream goes: api.auth.KeyCheck).

A stream open when the API shuts down ends within POLL_S, before its terminal status
(api.shutdown): open it again on the restarted API.

SQL is the truth: the stream re-reads the job whenever the worker publishes an event on Redis
and at least every `POLL_S`, so it works (more slowly) with Redis pub/sub unavailable too.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web

from api import openapi
from api.auth import KeyCheck, key_check, principal
from api.errors import ErrorOut
from api.job_listener import JobListener
from api.jobs import JOB_ID, job_id_param
from api.shutdown import SHUTDOWN, Shutdown
from api.sse import send_event
from api.state import SERVICE
from promptq.errors import NotFound
from promptq.models import JobKind, JobStatus
from promptq.service import JobService

logger = logging.getLogger(__name__)

routes = web.RouteTableDef()

#: Longest the stream goes without re-reading the job from SQL.
POLL_S = 0.25
#: A comment line is sent after this long without events, so proxies keep the connection.
KEEPALIVE_S = 15.0
#: How long the terminal status waits for token events still in flight from the worker.
DRAIN_S = 0.05

#: One server-sent event, for the OpenAPI spec: its `data` is a JSON object.
EVENT_SCHEMA = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"enum": ["status", "progress", "token", "revoked"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}


@routes.get("/api/jobs/{id}/stream")
@openapi.operation(
    responses={200: openapi.Content("text/event-stream", EVENT_SCHEMA), 404: ErrorOut},
    path_params=JOB_ID,
    tags=("jobs",),
)
async def stream_job(request: web.Request) -> web.StreamResponse:
    """Server-sent events of a job's status and progress, ending with its terminal status."""
    job_id = job_id_param(request)
    service = request.app[SERVICE]
    if not await service.store.get_states([job_id], owned_by=principal(request).owner_filter):
        raise NotFound(f"no job with id {job_id}")  # also when it is not the caller's
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass events through as they come
        }
    )
    async with JobListener(service, job_id) as listener:
        try:
            await response.prepare(request)
            await _follow(
                service, job_id, listener, response, key_check(request), request.app[SHUTDOWN]
            )
        except ConnectionResetError:
            logger.debug("stream of job %s: the client went away", job_id)
    return response


async def _follow(
    service: JobService,
    job_id: str,
    listener: JobListener,
    response: web.StreamResponse,
    key: KeyCheck,
    shutdown: Shutdown,
) -> None:
    sent: dict[str, Any] = {}
    last_write = time.monotonic()
    while True:
        if shutdown.stopping:
            logger.info("stream of job %s: the API is stopping; ending the stream", job_id)
            return
        if not await key.still_valid():
            logger.info("stream of job %s: the key was revoked; ending the stream", job_id)
            await send_event(response, "revoked", {})
            return
        state = (await service.store.get_states([job_id])).get(job_id)
        if state is None:
            return  # deleted while we watched
        status = {
            "status": state.status,
            "attempts": state.attempts,
            "max_attempts": state.max_attempts,
            "error": state.error,
            "error_code": state.error_code,
        }
        terminal = JobStatus(state.status).is_terminal
        if status != sent.get("status") and not terminal:
            await send_event(response, "status", status)
            sent["status"], last_write = status, time.monotonic()
        if state.kind == JobKind.SUMMARIZE:
            progress = (await service.checkpoints.progress([job_id]))[job_id].model_dump()
            if progress != sent.get("progress"):
                await send_event(response, "progress", progress)
                sent["progress"], last_write = progress, time.monotonic()
        if terminal:
            await _send_tokens(listener, response, DRAIN_S)
            job = await service.store.get_job(job_id)
            await send_event(response, "status", status | {"result": job.result if job else None})
            return
        if await _send_tokens(listener, response, POLL_S):
            last_write = time.monotonic()
        elif time.monotonic() - last_write > KEEPALIVE_S:
            await response.write(b": keep-alive\n\n")
            last_write = time.monotonic()


async def _send_tokens(listener: JobListener, response: web.StreamResponse, wait_s: float) -> bool:
    """Forward token events for up to `wait_s` (returning early on any other event); whether
    any was sent."""
    forwarded = False
    async for token in listener.tokens(wait_s):
        await send_event(response, "token", {"text": token.text})
        forwarded = True
    return forwarded
