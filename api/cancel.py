"""Cancel routes: `POST /api/jobs/{id}/cancel` and `POST /api/batches/{id}/cancel`."""

from __future__ import annotations

from aiohttp import web

from api import openapi
from api.auth import principal
from api.batches import BATCH_ID, batch_id_param
from api.errors import ErrorOut
from api.jobs import JOB_ID, job_id_param, json_response
from api.state import SERVICE
from promptq.batch_schemas import BatchOut
from promptq.cancel import Canceller
from promptq.models import JobStatus
from promptq.schemas import JobOut

routes = web.RouteTableDef()


@routes.post("/api/jobs/{id}/cancel")
@openapi.operation(
    responses={200: JobOut, 202: JobOut, 404: ErrorOut, 409: ErrorOut},
    path_params=JOB_ID,
    tags=("jobs",),
)
async def cancel_job(request: web.Request) -> web.Response:
    """200 with the cancelled job; 202 while a running job aborts; 409 if it had finished."""
    service = request.app[SERVICE]
    job = await Canceller(service).cancel_job(
        job_id_param(request), owned_by=principal(request).owner_filter
    )
    (out,) = await service.describe([job])
    status = 200 if job.status == JobStatus.CANCELLED else 202
    return json_response(out, status=status)


@routes.post("/api/batches/{id}/cancel")
@openapi.operation(
    responses={200: BatchOut, 202: BatchOut, 404: ErrorOut, 409: ErrorOut},
    path_params=BATCH_ID,
    tags=("batches",),
)
async def cancel_batch(request: web.Request) -> web.Response:
    """Cancel a batch's unfinished jobs (finished ones keep their results); 409 if it had
    finished. The batch is `cancelling` until its running jobs have stopped."""
    batch = await Canceller(request.app[SERVICE]).cancel_batch(
        batch_id_param(request), owned_by=principal(request).owner_filter
    )
    return json_response(batch, status=200 if batch.status == "cancelled" else 202)
