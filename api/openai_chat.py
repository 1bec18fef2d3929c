"""`POST /v1/chat/completions` and `GET /v1/models`: the OpenAI API, through the queue.

Every chat request becomes a persisted prompt job at interactive priority (ahead of any batch
work), and the response waits for its result: the `chat.completion` object, or with
`stream: true` OpenAI's `chat.completion.chunk` server-sent events ending in `data: [DONE]`,
with the tokens relayed from the worker as the backend produces them. The job id is in the
`x-promptq-job-id` header; the job stays readable at `/api/jobs/{id}` like any other.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web

from api import openai_openapi as spec
from api.auth import principal
from api.job_listener import JobListener, Token
from api.jobs import BadJSON, json_response, read_json
from api.openai_errors import SHOULD_RETRY, openai_error
from api.shutdown import SHUTDOWN, Stopping
from promptq import openai_format
from promptq.chat import ChatService
from promptq.errors import InvalidRequest
from promptq.model_catalog import ModelCatalog, UnknownModel
from promptq.models import Job, JobStatus
from promptq.openai_schemas import BadRequest, ChatCompletionRequest, parse_chat_request

logger = logging.getLogger(__name__)

routes = web.RouteTableDef()

CHAT = web.AppKey("openai_chat", ChatService)
CATALOG = web.AppKey("openai_model_catalog", ModelCatalog)

#: The response header naming the promptq job behind an answer.
JOB_ID_HEADER = "x-promptq-job-id"
#: Backend statuses passed on as they are when a job failed with them; other failures are 502.
PASSED_ON_STATUSES = frozenset({400, 404, 409, 413, 422, 429})


@routes.get("/v1/models")
@spec.list_models
async def list_models(request: web.Request) -> web.Response:
    """The backend's models (cached for PROMPTQ_MODELS_CACHE_S)."""
    models = await request.app[CATALOG].models()
    return json_response({"object": "list", "data": models})


@routes.get("/v1/models/{id:.+}")
@spec.retrieve_model
async def retrieve_model(request: web.Request) -> web.Response:
    """One of the backend's models; 404 if it does not serve it."""
    name = request.match_info["id"]
    for model in await request.app[CATALOG].models():
        if model.get("id") == name:
            return json_response(model)
    return openai_error(
        404, f"the model {name!r} is not served here", code="model_not_found", param="model"
    )


async def read_body(request: web.Request) -> Any:
    """The JSON body of a /v1 request. A body that is not JSON, empty included, is a 400
    (`invalid_request_error`), as OpenAI answers it; /api keeps its 422 for an empty body."""
    try:
        return await read_json(request)
    except BadJSON:
        raise
    except InvalidRequest as exc:  # an empty body
        raise BadRequest(exc.message) from None


@routes.post("/v1/chat/completions")
@spec.chat_completions
async def chat_completions(request: web.Request) -> web.StreamResponse:
    """Run a chat completion as a job and answer with its result (or stream it)."""
    chat_request = parse_chat_request(await read_body(request))
    try:
        await request.app[CATALOG].check([chat_request.model, *chat_request.fallback_models])
    except UnknownModel as exc:  # OpenAI's answer to a model it does not serve: a 404
        return openai_error(404, exc.message, code=exc.code, param="model")
    chat = request.app[CHAT]
    job = await chat.create(chat_request, owner_key_id=principal(request).key_id)
    wait_s = chat.service.settings.chat_wait_s
    async with JobListener(chat.service, job.id) as listener:
        if job.status == JobStatus.QUEUED:
            await chat.enqueue(job)
        if chat_request.stream:
            return await _stream(request, chat_request, job, listener, wait_s)
        try:
            async for item in listener.follow(wait_s, request.app[SHUTDOWN]):
                if isinstance(item, Job):
                    job = item
        except TimeoutError:
            return _timed_out(job)
        except Stopping as exc:
            return _stopping(job, exc)
    if job.status != JobStatus.SUCCEEDED:
        return await _job_error(chat, job)
    model = await chat.service.store.answered_model(job)
    return json_response(openai_format.chat_completion(job, model), headers={JOB_ID_HEADER: job.id})


async def _stream(
    request: web.Request,
    chat_request: ChatCompletionRequest,
    job: Job,
    listener: JobListener,
    wait_s: float,
) -> web.StreamResponse:
    """Relay the worker's tokens as chunks; the HTTP status is sent with the first of them, so
    a job that fails before any text still gets a proper error response."""
    relay = _Relay(request, job)
    finished: Job | None = None
    try:
        async for item in listener.follow(wait_s, request.app[SHUTDOWN]):
            if isinstance(item, Token):
                await relay.token(item)
            else:
                finished = item
    except TimeoutError:
        if not relay.started:
            return _timed_out(job)
        message = f"job {job.id} is still running; read it at /api/jobs/{job.id}"
        return await relay.fail(504, message)
    except Stopping as exc:
        return await relay.fail(503, exc.message) if relay.started else _stopping(job, exc)
    except ConnectionResetError:
        logger.info("stream of job %s: the client went away (the job goes on)", job.id)
        return relay.response or web.Response(status=499)
    assert finished is not None
    chat = request.app[CHAT]
    if finished.status != JobStatus.SUCCEEDED:
        if not relay.started:
            return await _job_error(chat, finished)
        return await relay.fail(502, finished.error or f"job {job.id} {finished.status}")
    model = await chat.service.store.answered_model(finished)
    return await relay.finish(finished, model, include_usage=chat_request.include_usage)


class _Relay:
    """Forwards streamed text once: a retried call's text is sent only past what was sent."""

    def __init__(self, request: web.Request, job: Job) -> None:
        self.request = request
        self.job = job
        self.response: web.StreamResponse | None = None
        self.sent = ""
        self.calls: dict[str, str] = {}
        self.model = job.model

    @property
    def started(self) -> bool:
        return self.response is not None

    async def token(self, token: Token) -> None:
        text = self.calls[token.call] = self.calls.get(token.call, "") + token.text
        if token.model:  # each chunk names the model writing it (a fallback's, maybe)
            self.model = token.model
        if len(text) > len(self.sent) and text.startswith(self.sent):
            await self._text(text[len(self.sent) :])
            self.sent = text

    async def finish(self, job: Job, model: str, *, include_usage: bool) -> web.StreamResponse:
        result = job.result or ""
        if not result.startswith(self.sent):
            return await self.fail(
                502,
                f"the answer changed when job {job.id} was retried; read the whole answer at "
                f"/api/jobs/{job.id}",
            )
        self.model = model
        if len(result) > len(self.sent):  # tokens we missed, or a cached answer
            await self._text(result[len(self.sent) :])
            self.sent = result
        response = await self._start()
        finish_reason = job.finish_reason or openai_format.DEFAULT_FINISH_REASON
        await self._send(openai_format.chunk(job, model, {}, finish_reason))
        if include_usage:
            await self._send(openai_format.usage_chunk(job, model))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def fail(self, status: int, message: str) -> web.StreamResponse:
        """An error event (the SDKs raise it as an APIError), after the text already sent."""
        response = await self._start()
        error = {"message": message, "type": "server_error", "param": None, "code": str(status)}
        await response.write(b"data: " + orjson.dumps({"error": error}) + b"\n\n")
        await response.write_eof()
        return response

    async def _text(self, text: str) -> None:
        await self._start()
        await self._send(openai_format.chunk(self.job, self.model, {"content": text}, None))

    async def _start(self) -> web.StreamResponse:
        if self.response is None:
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",
                    JOB_ID_HEADER: self.job.id,
                }
            )
            await response.prepare(self.request)
            self.response = response
            role = {"role": "assistant", "content": ""}
            await self._send(openai_format.chunk(self.job, self.model, role, None))
            return response
        return self.response

    async def _send(self, data: dict[str, Any]) -> None:
        assert self.response is not None
        await self.response.write(b"data: " + orjson.dumps(data) + b"\n\n")


async def _job_error(chat: ChatService, job: Job) -> web.Response:
    """The error of a failed or cancelled job, with the backend's status where it says
    something about the request; the SDK must not retry it (promptq already did)."""
    headers = {JOB_ID_HEADER: job.id, SHOULD_RETRY: "false"}
    if job.status == JobStatus.CANCELLED:
        return openai_error(409, f"job {job.id} was cancelled", code="cancelled", headers=headers)
    attempts = await chat.service.store.list_attempts(job.id)
    last_status = attempts[-1].status_code if attempts else None
    status = last_status if last_status in PASSED_ON_STATUSES else 502
    message = job.error or f"job {job.id} failed"
    return openai_error(status, message, code=job.error_code, headers=headers)


def _stopping(job: Job, exc: Stopping) -> web.Response:
    """The API stops before the job's answer came: a 503 the SDKs retry on the restarted API
    (a deterministic request is then answered from the cache if this job has answered)."""
    headers = {JOB_ID_HEADER: job.id, "Retry-After": "1"}
    return openai_error(503, exc.message, code="shutting_down", headers=headers)


def _timed_out(job: Job) -> web.Response:
    return openai_error(
        504,
        f"job {job.id} did not finish within PROMPTQ_CHAT_WAIT_S; it goes on: read it at "
        f"/api/jobs/{job.id}",
        code="timeout",
        headers={JOB_ID_HEADER: job.id, SHOULD_RETRY: "false"},
    )
