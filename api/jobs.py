"""Routes under /api/jobs: submit, read, list, attempt history, and retry."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, Field

from api import openapi
from api.auth import principal
from api.errors import ErrorOut
from api.params import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    choice,
    cursor_param,
    flag,
    page_limit,
    path_id,
    split_page,
)
from api.state import SERVICE
from promptq.errors import InvalidRequest, NotFound
from promptq.models import JobKind, JobStatus
from promptq.schemas import AttemptOut, JobOut, JobPage, job_create_adapter
from promptq.service import parse_job_request

routes = web.RouteTableDef()

#: The `{id}` of the per-job routes.
JOB_ID = {"id": "the job's id (a UUID)"}
#: Where a submitted or re-queued job can be read.
LOCATION = {202: {"Location": "the job's URL"}}


class JobListQuery(BaseModel):
    """The query parameters of `GET /api/jobs` (documentation; parsed by the handler)."""

    status: JobStatus | None = Field(default=None, description="only jobs in this status")
    kind: JobKind | None = Field(default=None, description="only jobs of this kind")
    batch_id: uuid.UUID | None = Field(default=None, description="only the jobs of this batch")
    model: str | None = Field(default=None, description="only jobs for this model")
    limit: int = Field(
        default=DEFAULT_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE, description="most jobs to return"
    )
    cursor: uuid.UUID | None = Field(
        default=None, description="`next_cursor` of the previous page, to get the next one"
    )
    include_input: bool = Field(
        default=False,
        description="give each job's `input` too (left out by default: a summarize job's "
        "document can be megabytes; `GET /api/jobs/{id}` always has it)",
    )


class AttemptList(BaseModel):
    """Every attempt of a job, oldest first."""

    job_id: str
    attempts: list[AttemptOut]


def json_response(body: BaseModel | dict[str, Any], status: int = 200, **kw: Any) -> web.Response:
    """Serialize a pydantic model (or plain dict) with orjson."""
    data = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", **kw
    )


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or an InvalidRequest (400 or 422) that says why not."""
    raw = await request.read()
    if not raw.strip():
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadJSON(f"the request body is not valid JSON: {exc}") from None


class BadJSON(InvalidRequest):
    """The request body is not valid JSON."""

    code = "invalid_json"
    http_status = 400


@routes.post("/api/jobs")
@openapi.operation(
    request=job_create_adapter,
    responses={202: JobOut, 409: ErrorOut},
    headers=LOCATION,
    tags=("jobs",),
)
async def create_job(request: web.Request) -> web.Response:
    """Submit a prompt or summarize job; 202 with the job (the existing one for a reused key)."""
    spec = parse_job_request(await read_json(request))
    service = request.app[SERVICE]
    job, created = await service.submit(spec, owner_key_id=principal(request).key_id)
    headers = {"Location": f"/api/jobs/{job.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    (out,) = await service.describe([job])
    return json_response(out, status=202, headers=headers)


@routes.get("/api/jobs")
@openapi.operation(query=JobListQuery, responses={200: JobPage, 422: ErrorOut}, tags=("jobs",))
async def list_jobs(request: web.Request) -> web.Response:
    """Newest first, filtered by `status`, `kind`, `batch_id` and `model`, paginated by `limit`
    and `cursor`; each job's `input` only with `include_input=true`."""
    query = request.query
    status = choice(query.get("status"), "status", [s.value for s in JobStatus])
    kind = choice(query.get("kind"), "kind", [k.value for k in JobKind])
    batch_id = _batch_filter(query.get("batch_id") or None)
    model = query.get("model") or None
    limit = page_limit(query.get("limit"))
    cursor = cursor_param(query.get("cursor"))
    with_input = flag(query.get("include_input"), "include_input")
    service = request.app[SERVICE]
    jobs = await service.store.list_jobs(
        status=status,
        kind=kind,
        limit=limit + 1,
        before_id=cursor,
        owned_by=principal(request).owner_filter,
        batch_id=batch_id,
        model=model,
        with_input=with_input,
    )
    page, next_cursor = split_page(jobs, limit)
    described = await service.describe(page, with_input=with_input)
    return json_response(JobPage(jobs=described, next_cursor=next_cursor))


@routes.get("/api/jobs/{id}")
@openapi.operation(responses={200: JobOut, 404: ErrorOut}, path_params=JOB_ID, tags=("jobs",))
async def get_job(request: web.Request) -> web.Response:
    """One job with its result, error, usage and attempt count."""
    job_id = job_id_param(request)
    service = request.app[SERVICE]
    job = await service.store.get_job(job_id, owned_by=principal(request).owner_filter)
    if job is None:  # also when it exists but is not the caller's: never say which
        raise NotFound(f"no job with id {job_id}")
    (out,) = await service.describe([job])
    return json_response(out)


@routes.get("/api/jobs/{id}/attempts")
@openapi.operation(responses={200: AttemptList, 404: ErrorOut}, path_params=JOB_ID, tags=("jobs",))
async def list_attempts(request: web.Request) -> web.Response:
    """Every attempt of a job, oldest first."""
    job_id = job_id_param(request)
    store = request.app[SERVICE].store
    owned_by = principal(request).owner_filter
    if await store.get_job(job_id, owned_by=owned_by) is None:
        raise NotFound(f"no job with id {job_id}")
    attempts = await store.list_attempts(job_id, owned_by=owned_by)
    return json_response(
        AttemptList(job_id=job_id, attempts=[AttemptOut.from_row(a) for a in attempts])
    )


@routes.post("/api/jobs/{id}/retry")
@openapi.operation(
    responses={202: JobOut, 404: ErrorOut, 409: ErrorOut},
    path_params=JOB_ID,
    headers=LOCATION,
    tags=("jobs",),
)
async def retry_job(request: web.Request) -> web.Response:
    """Run a failed or cancelled job again with a fresh attempt budget; 409 for other jobs."""
    job_id = job_id_param(request)
    service = request.app[SERVICE]
    if await service.store.get_job(job_id, owned_by=principal(request).owner_filter) is None:
        raise NotFound(f"no job with id {job_id}")
    job = await service.retry_one(job_id)
    (out,) = await service.describe([job])
    return json_response(out, status=202, headers={"Location": f"/api/jobs/{job.id}"})


def job_id_param(request: web.Request) -> str:
    """The `{id}` of the route as a canonical job id; NotFound when it cannot be one."""
    return path_id(request.match_info["id"], noun="job")


def _batch_filter(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidRequest(f"batch_id {value[:64]!r} is not a batch id") from None
