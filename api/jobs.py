"""Routes under /api/jobs: submit, read, list, and attempt history."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel

from api.state import SERVICE
from promptq.errors import InvalidRequest, NotFound
from promptq.models import JobKind, JobStatus
from promptq.schemas import AttemptOut, JobPage
from promptq.service import parse_job_request

routes = web.RouteTableDef()

#: Largest page `GET /api/jobs` returns.
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50
#: Deepest nesting accepted in a request body (job responses add a few levels of their own).
MAX_JSON_DEPTH = 64


def json_response(body: BaseModel | dict[str, Any], status: int = 200, **kw: Any) -> web.Response:
    """Serialize a pydantic model (or plain dict) with orjson."""
    data = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", **kw
    )


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or a 400 that says why not."""
    raw = await request.read()
    if not raw.strip():
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadJSON(f"the request body is not valid JSON: {exc}") from None
    # Cheap byte counts first: only a body that might break a rule is walked.
    if b"\\u0000" in raw or raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:
        _check_storable(value)
    return value


def _check_storable(value: Any) -> None:
    """Refuse what would be stored but then break: NUL characters and very deep nesting.

    PostgreSQL cannot store U+0000 in text or JSONB (the insert fails), and orjson cannot write
    a response nested more than 254 levels deep (the job would be saved but never readable).
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise InvalidRequest("strings may not contain NUL (\\u0000) characters")
            continue
        if not isinstance(item, dict | list):
            continue
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((key, depth) for key in item)
            stack.extend((child, depth + 1) for child in item.values())
        else:
            stack.extend((child, depth + 1) for child in item)


class BadJSON(InvalidRequest):
    """The request body is not valid JSON."""

    code = "invalid_json"
    http_status = 400


@routes.post("/api/jobs")
async def create_job(request: web.Request) -> web.Response:
    """Submit a prompt or summarize job; 202 with the job (the existing one for a reused key)."""
    spec = parse_job_request(await read_json(request))
    service = request.app[SERVICE]
    job, created = await service.submit(spec)
    headers = {"Location": f"/api/jobs/{job.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    (out,) = await service.describe([job])
    return json_response(out, status=202, headers=headers)


@routes.get("/api/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    """Newest first, filtered by `status` and `kind`, paginated by `limit` and `cursor`."""
    query = request.query
    status = _choice(query.get("status"), "status", [s.value for s in JobStatus])
    kind = _choice(query.get("kind"), "kind", [k.value for k in JobKind])
    limit = _limit(query.get("limit"))
    cursor = query.get("cursor") or None
    if cursor is not None:
        _job_id(cursor, what="cursor")
    service = request.app[SERVICE]
    jobs = await service.store.list_jobs(
        status=status, kind=kind, limit=limit + 1, before_id=cursor
    )
    page = jobs[:limit]
    next_cursor = page[-1].id if len(jobs) > limit else None
    return json_response(JobPage(jobs=await service.describe(page), next_cursor=next_cursor))


@routes.get("/api/jobs/{id}")
async def get_job(request: web.Request) -> web.Response:
    """One job with its result, error, usage and attempt count."""
    job_id = _job_id(request.match_info["id"])
    service = request.app[SERVICE]
    job = await service.store.get_job(job_id)
    if job is None:
        raise NotFound(f"no job with id {job_id}")
    (out,) = await service.describe([job])
    return json_response(out)


@routes.get("/api/jobs/{id}/attempts")
async def list_attempts(request: web.Request) -> web.Response:
    """Every attempt of a job, oldest first."""
    job_id = _job_id(request.match_info["id"])
    store = request.app[SERVICE].store
    if await store.get_job(job_id) is None:
        raise NotFound(f"no job with id {job_id}")
    attempts = await store.list_attempts(job_id)
    return json_response(
        {
            "job_id": job_id,
            "attempts": [AttemptOut.from_row(a).model_dump(mode="json") for a in attempts],
        }
    )


def job_id_param(request: web.Request) -> str:
    """The `{id}` of the route as a canonical job id; NotFound when it cannot be one."""
    return _job_id(request.match_info["id"])


def _job_id(value: str, *, what: str = "job id") -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        if what == "job id":
            raise NotFound(f"no job with id {value[:64]!r}") from None
        raise InvalidRequest(
            f"{what} {value[:64]!r} is not valid; pass next_cursor back as is"
        ) from None


def _choice(value: str | None, name: str, allowed: list[str]) -> str | None:
    if value is None or value == "":
        return None
    if value not in allowed:
        raise InvalidRequest(f"{name} must be one of {', '.join(allowed)}; got {value[:64]!r}")
    return value


def _limit(value: str | None) -> int:
    if value is None or value == "":
        return DEFAULT_PAGE_SIZE
    try:
        limit = int(value)
    except ValueError:
        raise InvalidRequest(f"limit must be an integer; got {value[:64]!r}") from None
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE_SIZE}; got {limit}")
    return limit
