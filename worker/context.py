"""The typed context every job function receives (arq passes it as a dict)."""

from __future__ import annotations

import random
from typing import TypedDict

from promptq.checkpoints import ChunkStore
from promptq.metrics import Metrics
from promptq.queue import QueueClient
from promptq.settings import Settings
from promptq.store import JobStore
from worker.ahead import AheadAgain
from worker.announce import StatusAnnouncer
from worker.cancel import CancelWatcher
from worker.followers import FollowerWaker
from worker.leases import LeaseKeeper
from worker.limiter import Limiter
from worker.routing import ModelRouter
from worker.slots import ModelSlots


class WorkerContext(TypedDict, total=False):
    """What `on_startup` puts in arq's ctx, plus arq's own per-job keys."""

    settings: Settings
    store: JobStore
    #: Checkpoints of summarize jobs (`job_chunks`).
    checkpoints: ChunkStore
    queue: QueueClient
    #: Routes each call by model to its endpoint, inside the endpoint's global limits.
    llm: ModelRouter
    limiter: Limiter
    rng: random.Random
    #: Renews the leases of the attempts this worker is running.
    leases: LeaseKeeper
    #: Aborts attempts whose job is cancelled while they run.
    cancels: CancelWatcher
    #: Moves retrying interactive jobs ahead of bulk work when their backoff ends.
    ahead: AheadAgain
    #: Wakes the followers put back on the queue once their leader is done.
    followers: FollowerWaker
    #: Publishes status events to listeners, coalesced (worker.announce).
    announcer: StatusAnnouncer
    #: The worker_concurrency jobs that may work with the model at once (worker.slots).
    slots: ModelSlots
    #: This worker's name in `job_attempts.worker`: host:pid.
    worker_name: str
    #: This worker's Prometheus metrics (in memory; served on --metrics-port).
    metrics: Metrics
    # Set by arq for each job:
    job_id: str
    job_try: int
    #: The job's score in the queue: when it was due (Unix ms); interactive jobs days earlier.
    score: int
