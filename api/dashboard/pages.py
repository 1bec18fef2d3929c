"""The dashboard's pages: overview (batches, counts, chart), job listing, a job, a batch.

Each page can also render just its live part (`?partial=1`), which the page's script fetches
again whenever the event stream reports a change, so nothing is rendered twice in two languages.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from aiohttp import web

from api.auth import principal
from api.dashboard.queries import CHART_WINDOWS_S, STATUSES, DashboardReader, JobFilter
from api.dashboard.render import partial_requested, render
from api.params import choice, split_page
from api.state import SERVICE
from promptq import clock
from promptq.batches import BatchService
from promptq.errors import InvalidRequest, NotFound
from promptq.models import TERMINAL_STATUSES, JobKind, JobStatus

routes = web.RouteTableDef()

#: Jobs on one page of the listing.
PAGE_SIZE = 50
#: The newest batches the overview shows.
BATCHES_SHOWN = 50
#: Characters of a document shown on a job's page; the rest is in the API and SQL.
DOCUMENT_PREVIEW_CHARS = 20_000
RETRYABLE = frozenset({JobStatus.FAILED, JobStatus.CANCELLED})


def reader(request: web.Request) -> DashboardReader:
    """The dashboard's queries on the app's database."""
    return DashboardReader(request.app[SERVICE].store.sessionmaker)


@routes.get("/", name="page:overview")
async def overview(request: web.Request) -> web.Response:
    """Jobs per status, the newest batches with their progress, and the chart."""
    owned_by = principal(request).owner_filter
    batches = BatchService(request.app[SERVICE])
    context = {
        "counts": await reader(request).status_counts(owned_by=owned_by),
        "batches": await batches.list_batches(
            limit=BATCHES_SHOWN, before_id=None, owned_by=owned_by
        ),
    }
    if partial_requested(request):
        return render(request, "_overview.html", context)
    return render(request, "overview.html", context | {"windows": list(CHART_WINDOWS_S)})


@routes.get("/jobs", name="page:jobs")
async def jobs(request: web.Request) -> web.Response:
    """Jobs, newest first, filtered by status, kind, model and batch."""
    query = request.query
    try:
        where = JobFilter(
            status=choice(query.get("status"), "status", STATUSES),
            kind=choice(query.get("kind"), "kind", [k.value for k in JobKind]),
            model=query.get("model") or None,
            batch_id=_uuid(query.get("batch"), "batch"),
        )
        cursor = _uuid(query.get("cursor"), "cursor")
    except InvalidRequest as exc:  # a filter typed into the address bar: a page, not JSON
        return render(request, "bad_request.html", {"message": exc.message}, status=422)
    rows = await reader(request).jobs(
        where, owned_by=principal(request).owner_filter, limit=PAGE_SIZE + 1, before_id=cursor
    )
    page, next_cursor = split_page(rows, PAGE_SIZE)
    filters = {k: v for k, v in query.items() if k in ("status", "kind", "model", "batch") and v}
    context = {
        "jobs": page,
        "next_cursor": next_cursor,
        "filters": filters,
        "statuses": STATUSES,
        "kinds": [k.value for k in JobKind],
    }
    if partial_requested(request):
        return render(request, "_jobs.html", context)
    return render(request, "jobs.html", context)


@routes.get("/jobs/{id}", name="page:job")
async def job(request: web.Request) -> web.Response:
    """One job: input, result, every attempt, and the chunks of a summarize job."""
    job_id = _uuid(request.match_info["id"], "job", missing_is_404=True)
    service = request.app[SERVICE]
    owned_by = principal(request).owner_filter
    row = None if job_id is None else await service.store.get_job(job_id, owned_by=owned_by)
    if row is None:  # also when it is another tenant's: never say which
        what = f"job {request.match_info['id'][:64]}"
        return render(request, "not_found.html", {"what": what}, status=404)
    (out,) = await service.describe([row])
    document = row.input.get("document")
    context = {
        "job": row,
        "out": out,
        "attempts": await service.store.list_attempts(row.id),
        "chunks": await service.checkpoints.list_chunks(row.id),
        "document_preview": document[:DOCUMENT_PREVIEW_CHARS] if document else None,
        "document_rest_chars": max(0, len(document) - DOCUMENT_PREVIEW_CHARS) if document else 0,
        "params_json": _pretty(row.input.get("params") or {}),
        "can_retry": JobStatus(row.status) in RETRYABLE,
        "can_cancel": JobStatus(row.status) not in TERMINAL_STATUSES,
    }
    if partial_requested(request):
        return render(request, "_job.html", context)
    return render(request, "job.html", context)


@routes.get("/batches/{id}", name="page:batch")
async def batch(request: web.Request) -> web.Response:
    """One batch: its progress, counts per status, and its newest jobs."""
    batch_id = _uuid(request.match_info["id"], "batch", missing_is_404=True)
    owned_by = principal(request).owner_filter
    try:
        if batch_id is None:
            raise NotFound("not an id")
        view = await BatchService(request.app[SERVICE]).get(batch_id, owned_by=owned_by)
    except NotFound:  # also when it is another tenant's: never say which
        what = f"batch {request.match_info['id'][:64]}"
        return render(request, "not_found.html", {"what": what}, status=404)
    rows = await reader(request).jobs(
        JobFilter(batch_id=view.id), owned_by=owned_by, limit=PAGE_SIZE + 1
    )
    context = {
        "batch": view,
        "jobs": rows[:PAGE_SIZE],
        "more_jobs": len(rows) > PAGE_SIZE,
        "can_cancel": view.counts.active > 0,
    }
    if partial_requested(request):
        return render(request, "_batch.html", context)
    return render(request, "batch.html", context)


@routes.get("/ui/chart", name="dashboard:chart")
async def chart(request: web.Request) -> web.Response:
    """The chart's data: jobs finished and attempt latency per time bucket, as JSON."""
    window = request.query.get("window") or "1h"
    if window not in CHART_WINDOWS_S:
        raise InvalidRequest(f"window must be one of {', '.join(CHART_WINDOWS_S)}")
    window_s, bucket_s = CHART_WINDOWS_S[window]
    data = await reader(request).chart(
        owned_by=principal(request).owner_filter,
        now=clock.now(),
        window_s=window_s,
        bucket_s=bucket_s,
    )
    return web.Response(
        body=orjson.dumps(data),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _uuid(value: str | None, name: str, *, missing_is_404: bool = False) -> str | None:
    """A canonical UUID, None when absent; a 400 for a malformed one (None if `missing_is_404`)."""
    if not value:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        if missing_is_404:
            return None
        raise InvalidRequest(f"{name} must be an id; got {value[:64]!r}") from None


def _pretty(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
