"""The dashboard's reads: jobs per status, filtered job listings, chart buckets.

(Batches with their counts come from promptq.batches.BatchService, as in the batch routes.)

Every read takes `owned_by` (a key id, or None for admins) so a tenant sees only its own rows.
Listings select the columns a table shows, never a job's input or result (a summarize job's
input holds its whole document), which is why they don't use JobStore.list_jobs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Integer, cast, extract, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from promptq.models import TERMINAL_STATUSES, Job, JobAttempt, JobStatus

logger = logging.getLogger(__name__)

#: The chart's time windows: name -> (window, bucket) in seconds; about 60 buckets each.
CHART_WINDOWS_S: dict[str, tuple[int, int]] = {
    "15m": (15 * 60, 15),
    "1h": (3600, 60),
    "6h": (6 * 3600, 6 * 60),
    "24h": (24 * 3600, 24 * 60),
}
STATUSES = [s.value for s in JobStatus]


@dataclass(frozen=True, slots=True)
class JobFilter:
    """What a job listing is restricted to; None means any."""

    status: str | None = None
    kind: str | None = None
    model: str | None = None
    batch_id: str | None = None


@dataclass(frozen=True, slots=True)
class JobRow:
    """One line of a job listing."""

    id: str
    kind: str
    status: str
    model: str
    attempts: int
    max_attempts: int
    batch_id: str | None
    batch_index: int | None
    error_code: str | None
    created_at: datetime
    finished_at: datetime | None

    @property
    def duration_s(self) -> float | None:
        """Seconds from submission to the end, for finished jobs."""
        if self.finished_at is None:
            return None
        return (self.finished_at - self.created_at).total_seconds()


class DashboardReader:
    """Read-only queries for the dashboard's pages, chart and event stream."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker

    async def status_counts(self, *, owned_by: str | None) -> dict[str, int]:
        """Jobs per status (every status present, zeros included)."""
        query = select(Job.status, func.count()).group_by(Job.status)
        if owned_by is not None:
            query = query.where(Job.owner_key_id == owned_by)
        counts = dict.fromkeys(STATUSES, 0)
        async with self._sessionmaker() as session:
            for status, count in await session.execute(query):
                counts[status] = int(count)
        return counts

    async def jobs(
        self,
        where: JobFilter,
        *,
        owned_by: str | None,
        limit: int,
        before_id: str | None = None,
    ) -> list[JobRow]:
        """Newest first; pass the last id seen as `before_id` for the next page."""
        query = select(
            Job.id,
            Job.kind,
            Job.status,
            Job.model,
            Job.attempts,
            Job.max_attempts,
            Job.batch_id,
            Job.batch_index,
            Job.error_code,
            Job.created_at,
            Job.finished_at,
        ).limit(limit)
        if owned_by is not None:
            query = query.where(Job.owner_key_id == owned_by)
        for column, value in (
            (Job.status, where.status),
            (Job.kind, where.kind),
            (Job.model, where.model),
            (Job.batch_id, where.batch_id),
        ):
            if value is not None:
                query = query.where(column == value)
        if before_id is not None:
            query = query.where(Job.id < before_id)
        query = query.order_by(Job.id.desc())
        async with self._sessionmaker() as session:
            return [JobRow(*row) for row in await session.execute(query)]

    async def chart(
        self, *, owned_by: str | None, now: datetime, window_s: int, bucket_s: int
    ) -> dict[str, Any]:
        """Jobs finished per status and attempt latency (mean, max) per time bucket.

        Returns `{"bucket_s", "buckets": [{"t", "succeeded", "failed", "cancelled",
        "attempts", "mean_latency_ms", "max_latency_ms"}, ...]}`, oldest first, with a bucket
        for every interval of the window (zeros where nothing finished); `t` is the bucket's
        start in Unix seconds.
        """
        since = now - timedelta(seconds=window_s)
        first = int(since.timestamp()) // bucket_s * bucket_s
        buckets: dict[int, dict[str, Any]] = {
            t: {
                "t": t,
                "succeeded": 0,
                "failed": 0,
                "cancelled": 0,
                "attempts": 0,
                "mean_latency_ms": None,
                "max_latency_ms": None,
            }
            for t in range(first, int(now.timestamp()) + 1, bucket_s)
        }
        async with self._sessionmaker() as session:
            dialect = session.get_bind().dialect.name
            job_bucket = _bucket(Job.finished_at, bucket_s, dialect).label("bucket")
            finished = (
                select(job_bucket, Job.status, func.count())
                .where(Job.finished_at >= since, Job.status.in_(list(TERMINAL_STATUSES)))
                .group_by(job_bucket, Job.status)
            )
            attempt_bucket = _bucket(JobAttempt.finished_at, bucket_s, dialect).label("bucket")
            latency = (
                select(
                    attempt_bucket,
                    func.count(),
                    func.avg(JobAttempt.latency_ms),
                    func.max(JobAttempt.latency_ms),
                )
                .where(JobAttempt.finished_at >= since, JobAttempt.latency_ms.is_not(None))
                .group_by(attempt_bucket)
            )
            if owned_by is not None:
                finished = finished.where(Job.owner_key_id == owned_by)
                latency = latency.join(Job, Job.id == JobAttempt.job_id).where(
                    Job.owner_key_id == owned_by
                )
            for t, status, count in await session.execute(finished):
                if (bucket := buckets.get(int(t))) is not None:
                    bucket[status] = int(count)
            for t, count, mean_ms, max_ms in await session.execute(latency):
                if (bucket := buckets.get(int(t))) is not None:
                    bucket["attempts"] = int(count)
                    bucket["mean_latency_ms"] = round(float(mean_ms), 1)
                    bucket["max_latency_ms"] = int(max_ms)
        return {"bucket_s": bucket_s, "buckets": list(buckets.values())}


def _bucket(column: Any, bucket_s: int, dialect: str) -> ColumnElement[int]:
    """The start (Unix seconds) of the `bucket_s` interval a timestamp falls in."""
    if dialect == "sqlite":
        epoch: ColumnElement[int] = cast(func.strftime("%s", column), Integer)
    else:
        epoch = cast(func.floor(extract("epoch", column)), BigInteger)
    return epoch - epoch % bucket_s
