"""Native batches over the real API, Redis and database (SQLite and PostgreSQL).

Given the API app on an ephemeral port and an in-process worker talking to the fake LLM, when
a client submits a batch (JSON body, JSONL stream, or multipart file), then every item becomes
a job in submission order, queued in arq's own format, and the batch reports counts, progress
and token usage; an invalid upload is refused with per-line errors and creates nothing.
"""

from __future__ import annotations

import csv
import io
import json
import socket
from datetime import timedelta
from typing import Any

import orjson
import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.jobs import deserialize_job_raw
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import func, select, update

from promptq import clock
from promptq.batch_items import ItemSpec
from promptq.batches import BatchService
from promptq.models import Batch, Job
from promptq.queue import QueueClient, deserialize
from promptq.service import JobService, parse_job_request
from promptq.testing.fake_llm import FakeLLM, expected_reply
from tests.conftest import ApiStarter, KeyFactory, WorkerFactory, bearer, wait_for, wait_terminal
from tests.integration.test_api import any_text, job_like, json_values, plausible_jobs
from worker.reconcile import Reconciler

Client = TestClient[web.Request, web.Application]
NDJSON = {"Content-Type": "application/x-ndjson"}


def prompt(content: str, **extra: Any) -> dict[str, Any]:
    """A prompt job request with one user message."""
    return {"kind": "prompt", "messages": [{"role": "user", "content": content}], **extra}


def jsonl(items: list[Any]) -> bytes:
    """Items as a JSONL body (stdlib json: it writes integers of any size, as clients may)."""
    return "".join(json.dumps(item) + "\n" for item in items).encode()


@pytest.fixture
async def admin(start_api: ApiStarter, make_key: KeyFactory) -> Client:
    """An API client with an admin key."""
    return await start_api(bearer(await make_key("batch-admin", admin=True)))


async def table_counts(service: JobService) -> tuple[int, int]:
    """(batches, jobs) rows in the database."""
    async with service.store.sessionmaker() as session:
        batches = (await session.execute(select(func.count()).select_from(Batch))).scalar_one()
        jobs = (await session.execute(select(func.count()).select_from(Job))).scalar_one()
    return batches, jobs


async def get_batch(api: Client, batch_id: str) -> dict[str, Any]:
    """GET /api/batches/{id} (asserting 200)."""
    async with api.get(f"/api/batches/{batch_id}") as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def wait_batch(api: Client, batch_id: str, status: str = "completed") -> dict[str, Any]:
    """Wait until the batch reaches `status`; return it."""
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        seen.update(await get_batch(api, batch_id))
        return seen["status"] == status

    await wait_for(reached, timeout_s=30)
    return seen


async def test_jsonl_batch_runs_in_order_with_counts_and_usage(
    admin: Client, service: JobService, fake_llm: FakeLLM, start_worker: WorkerFactory
) -> None:
    items = [prompt(f"item {i}", custom_id=f"c-{i}") for i in range(12)]
    async with admin.post(
        "/api/batches?name=nightly", data=jsonl(items), headers=NDJSON
    ) as response:
        assert response.status == 201, await response.text()
        created = await response.json()
    assert created["name"] == "nightly" and created["created"] == 12 and created["total"] == 12
    assert created["counts"]["queued"] == 12 and created["status"] == "in_progress"
    assert created["progress"] == {"done": 0, "total": 12, "fraction": 0.0}
    assert response.headers["Location"] == f"/api/batches/{created['id']}"

    # Queued in arq's own format: the job key holds what enqueue_job would have written.
    redis = service.queue.redis
    async with service.store.sessionmaker() as session:
        ids = list(
            (
                await session.execute(
                    select(Job.id).where(Job.batch_id == created["id"]).order_by(Job.batch_index)
                )
            ).scalars()
        )
    assert await redis.zcard(service.queue.queue_name) == 12
    raw = await redis.get(job_key_prefix + ids[0])
    function, args, kwargs, job_try, _ = deserialize_job_raw(raw, deserializer=deserialize)
    assert (function, list(args), kwargs, job_try) == ("run_job", [ids[0]], {}, None)
    assert await redis.pttl(job_key_prefix + ids[0]) > 0
    # ...and arq's own enqueue agrees the job is there: a second enqueue is refused.
    assert await service.queue.enqueue(ids[0]) is False

    await start_worker()
    done = await wait_batch(admin, created["id"])
    assert done["counts"]["succeeded"] == 12 and done["progress"]["fraction"] == 1.0
    assert done["completed_at"] is not None
    assert done["usage"]["prompt_tokens"] == fake_llm.stats.prompt_tokens_total > 0
    assert done["usage"]["completion_tokens"] == fake_llm.stats.completion_tokens_total > 0

    async with admin.get(f"/api/batches/{created['id']}/results") as response:
        assert response.status == 200
        lines = [orjson.loads(line) for line in (await response.read()).splitlines()]
    assert [line["custom_id"] for line in lines] == [f"c-{i}" for i in range(12)]
    assert [line["index"] for line in lines] == list(range(12))
    for i, line in enumerate(lines):
        assert line["status"] == "succeeded"
        assert line["result"] == expected_reply("fake-small", items[i]["messages"])
        assert line["latency_ms"] is not None and line["prompt_tokens"] > 0

    async with admin.get(f"/api/jobs/{lines[5]['job_id']}") as response:
        job = await response.json()
    assert (job["batch_id"], job["batch_index"], job["custom_id"]) == (created["id"], 5, "c-5")

    async with admin.get(f"/api/batches/{created['id']}/results?format=csv") as response:
        assert response.headers["Content-Type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(await response.text())))
    assert [row["custom_id"] for row in rows] == [f"c-{i}" for i in range(12)]
    assert rows[3]["result"] == lines[3]["result"]

    async with admin.get("/api/jobs", params={"batch_id": created["id"], "limit": "5"}) as r:
        page = await r.json()
    assert len(page["jobs"]) == 5 and page["next_cursor"]


async def test_invalid_upload_lists_lines_and_creates_nothing(
    admin: Client, service: JobService
) -> None:
    body = b"\n".join(
        [
            orjson.dumps(prompt("fine")),
            b"{not json",
            orjson.dumps({"kind": "prompt", "messages": []}),
            b"",
            orjson.dumps([1, 2]),
            orjson.dumps(prompt("dup", idempotency_key="k")),
            orjson.dumps(prompt("dup again", idempotency_key="k")),
        ]
    )
    async with admin.post("/api/batches", data=body, headers=NDJSON) as response:
        assert response.status == 422
        error = (await response.json())["error"]
    assert error["code"] == "invalid_batch"
    assert [line["line"] for line in error["lines"]] == [2, 3, 5, 7]
    assert "JSON" in error["lines"][0]["message"]
    assert "messages" in error["lines"][1]["message"]
    assert "line 6" in error["lines"][3]["message"]
    assert "4 of 6" in error["message"]
    assert await table_counts(service) == (0, 0)
    assert await service.queue.redis.zcard(service.queue.queue_name) == 0

    # The same rules for a JSON body: item n is "line" n.
    async with admin.post("/api/batches", json={"jobs": [prompt("ok"), {"kind": "x"}]}) as r:
        assert r.status == 422
        assert [line["line"] for line in (await r.json())["error"]["lines"]] == [2]
    for bad in (b"", b"\n\n"):
        async with admin.post("/api/batches", data=bad, headers=NDJSON) as r:
            assert r.status == 422
    async with admin.post("/api/batches", data=b"x", headers={"Content-Type": "text/plain"}) as r:
        assert r.status == 422
    async with admin.post("/api/batches", json={"jobs": "nope"}) as r:
        assert r.status == 422
    async with admin.post("/api/batches", json={"jobs": [], "extra": 1}) as r:
        assert r.status == 422
    unstorable: list[dict[str, Any]] = [
        {"jobs": [prompt("x", custom_id="a\u0000b")]},
        {"jobs": [prompt("x")], "models": ["m\u0000"]},
        {"jobs": [prompt("x")], "metadata": {"k": "v\u0000"}},
        {"jobs": [prompt("x")], "metadata": {"k": "v" * 20_000}},
        {"jobs": [prompt("x")], "name": 5},
    ]
    for body in unstorable:
        async with admin.post("/api/batches", json=body) as r:
            assert r.status == 422, (body, await r.text())
    async with admin.post(
        "/api/batches?model=a%00b", data=jsonl([prompt("x")]), headers=NDJSON
    ) as r:
        assert r.status == 422
    assert await table_counts(service) == (0, 0)


async def test_limits_give_413(start_api: ApiStarter, make_key: KeyFactory) -> None:
    api = await start_api(
        bearer(await make_key("small", admin=True)), batch_max_items=3, batch_max_bytes=2048
    )
    async with api.post("/api/batches", data=jsonl([prompt("x")] * 4), headers=NDJSON) as r:
        assert r.status == 413
        assert "PROMPTQ_BATCH_MAX_ITEMS" in (await r.json())["error"]["message"]
    async with api.post(
        "/api/batches", json={"jobs": [prompt("x")] * 2, "models": ["a", "b"]}
    ) as r:
        assert r.status == 413  # 2 items x 2 models > 3 jobs
    big = jsonl([prompt("y" * 1000)] * 3)
    async with api.post("/api/batches", data=big, headers=NDJSON) as r:
        assert r.status == 413
        assert "PROMPTQ_BATCH_MAX_BYTES" in (await r.json())["error"]["message"]


async def test_multipart_upload_and_json_body(admin: Client, service: JobService) -> None:
    form = FormData()
    form.add_field("name", "from-a-file")
    form.add_field("models", "fake-small,fake-large")
    form.add_field("file", jsonl([prompt("a"), prompt("b")]), filename="jobs.jsonl")
    async with admin.post("/api/batches", data=form) as response:
        assert response.status == 201, await response.text()
        created = await response.json()
    assert created["models"] == ["fake-small", "fake-large"] and created["total"] == 4
    async with admin.get("/api/jobs", params={"model": "fake-large"}) as response:
        large = (await response.json())["jobs"]
    assert len(large) == 2 and {job["model"] for job in large} == {"fake-large"}

    async with admin.post(
        "/api/batches", json={"jobs": [prompt("c"), prompt("d")], "name": "json"}
    ) as response:
        assert response.status == 201
        assert (await response.json())["total"] == 2
    assert await table_counts(service) == (2, 6)


async def test_form_fields_apply_in_any_order(admin: Client) -> None:
    # Given a form whose fields come after its file (curl -F sends parts in the order given)
    form = FormData()
    form.add_field("file", jsonl([prompt("a")]), filename="jobs.jsonl")
    form.add_field("name", "fields-last")
    form.add_field("models", "fake-small,fake-large")
    async with admin.post("/api/batches", data=form) as response:
        assert response.status == 201, await response.text()
        created = await response.json()
    # Then they apply all the same
    assert (created["name"], created["models"]) == ("fields-last", ["fake-small", "fake-large"])
    assert created["total"] == 2


async def test_options_in_the_wrong_place_are_refused(admin: Client, service: JobService) -> None:
    # Given batch options as query parameters of a JSON body and of a form, and a misspelt
    # option of a JSONL upload
    form = FormData()
    form.add_field("file", jsonl([prompt("a")]), filename="jobs.jsonl")
    attempts = [
        admin.post("/api/batches", params={"name": "n"}, json={"jobs": [prompt("a")]}),
        admin.post("/api/batches", params={"models": "fake-small"}, data=form),
        admin.post(
            "/api/batches", params={"modles": "x"}, data=jsonl([prompt("a")]), headers=NDJSON
        ),
    ]
    # Then each is refused with a message saying where they go, and nothing is created
    messages = []
    for attempt in attempts:
        async with attempt as response:
            assert response.status == 422, await response.text()
            messages.append((await response.json())["error"]["message"])
    assert "send them as fields of the JSON body" in messages[0]
    assert "send them as form fields" in messages[1]
    assert "modles" in messages[2]
    assert await table_counts(service) == (0, 0)


async def test_a_compare_cursor_out_of_range_is_refused(admin: Client) -> None:
    async with admin.post("/api/batches", json={"jobs": [prompt("a")]}) as response:
        batch_id = (await response.json())["id"]
    for cursor in ("99999999999999999999999", "-1", "1e3", "٣"):
        async with admin.get(f"/api/batches/{batch_id}/compare", params={"cursor": cursor}) as r:
            assert r.status == 422, (cursor, await r.text())
            assert "cursor" in (await r.json())["error"]["message"]
    async with admin.get(f"/api/batches/{batch_id}/compare", params={"cursor": "0"}) as r:
        assert r.status == 200 and (await r.json())["rows"] == []


async def test_idempotency_keys_inside_a_batch(admin: Client, service: JobService) -> None:
    items = [prompt("one", idempotency_key="k1"), prompt("two", idempotency_key="k2")]
    async with admin.post("/api/batches", data=jsonl(items), headers=NDJSON) as r:
        first = await r.json()
    assert (first["created"], first["reused"]) == (2, 0)
    items.append(prompt("three"))
    async with admin.post("/api/batches", data=jsonl(items), headers=NDJSON) as r:
        second = await r.json()
    assert (second["created"], second["reused"]) == (1, 2)
    assert await table_counts(service) == (2, 3)

    clash = [prompt("new"), prompt("different", idempotency_key="k1")]
    async with admin.post("/api/batches", data=jsonl(clash), headers=NDJSON) as r:
        assert r.status == 409
        assert (await r.json())["error"]["code"] == "idempotency_conflict"
    assert await table_counts(service) == (2, 3)  # nothing from the refused batch


async def test_a_batch_sent_again_is_the_batch_sent_first(
    admin: Client, service: JobService
) -> None:
    # Given a batch whose items all have idempotency keys
    items = [prompt(f"item {n}", custom_id=f"c{n}", idempotency_key=f"again-{n}") for n in range(3)]
    async with admin.post("/api/batches", data=jsonl(items), headers=NDJSON) as response:
        assert response.status == 201
        first = await response.json()

    # When it is sent again (a client retrying after a timeout), whole or as JSON
    again = [
        admin.post("/api/batches", data=jsonl(items), headers=NDJSON),
        admin.post("/api/batches", json={"jobs": items}),
    ]
    for attempt in again:
        async with attempt as response:
            # Then the answer is the first batch, with every item, and nothing is created
            assert response.status == 200, await response.text()
            assert response.headers["Idempotent-Replayed"] == "true"
            assert response.headers["Location"] == f"/api/batches/{first['id']}"
            body = await response.json()
        assert (body["id"], body["total"], body["created"], body["reused"]) == (
            first["id"],
            3,
            0,
            3,
        )
    assert await table_counts(service) == (1, 3)

    # But a part of it, or the same items on other models, is a batch of its own
    async with admin.post("/api/batches", data=jsonl(items[:2]), headers=NDJSON) as response:
        assert response.status == 201
        part = await response.json()
    assert part["id"] != first["id"] and (part["created"], part["reused"]) == (0, 2)
    async with admin.post(
        "/api/batches", json={"jobs": items, "models": ["fake-small"]}
    ) as response:
        assert response.status == 201
        assert (await response.json())["created"] == 3


async def test_batches_are_private_to_their_key(
    start_api: ApiStarter, make_key: KeyFactory
) -> None:
    alice = await start_api(bearer(await make_key("alice")))
    bob = await start_api(bearer(await make_key("bob")))
    admin = await start_api(bearer(await make_key("root", admin=True)))
    async with alice.post("/api/batches", json={"jobs": [prompt("secret")]}) as r:
        batch_id = (await r.json())["id"]
    for path in ("", "/results", "/compare"):
        async with bob.get(f"/api/batches/{batch_id}{path}") as r:
            assert r.status == 404, path
    async with bob.post(f"/api/batches/{batch_id}/cancel") as r:
        assert r.status == 404
    async with bob.get("/api/batches") as r:
        assert (await r.json())["batches"] == []
    async with bob.get("/api/jobs", params={"batch_id": batch_id}) as r:
        assert (await r.json())["jobs"] == []
    async with admin.get("/api/batches") as r:
        assert [b["id"] for b in (await r.json())["batches"]] == [batch_id]
    async with admin.get(f"/api/batches/{batch_id}") as r:
        assert r.status == 200
    for bad in ("nope", "00000000-0000-0000-0000-000000000000"):
        async with alice.get(f"/api/batches/{bad}") as r:
            assert r.status == 404
    async with alice.get("/api/batches", params={"cursor": "bad"}) as r:
        assert r.status == 422
    async with alice.get(f"/api/batches/{batch_id}/results", params={"format": "xml"}) as r:
        assert r.status == 422


async def test_list_pages_newest_first(admin: Client) -> None:
    ids = []
    for i in range(3):
        async with admin.post("/api/batches", json={"jobs": [prompt(str(i))]}) as r:
            ids.append((await r.json())["id"])
    async with admin.get("/api/batches", params={"limit": "2"}) as r:
        page = await r.json()
    assert [b["id"] for b in page["batches"]] == ids[::-1][:2]
    async with admin.get("/api/batches", params={"limit": "2", "cursor": page["next_cursor"]}) as r:
        rest = await r.json()
    assert [b["id"] for b in rest["batches"]] == [ids[0]] and rest["next_cursor"] is None


async def test_a_batch_saved_while_redis_is_down_is_queued_by_the_reconciler(
    service: JobService,
    fake_llm: FakeLLM,
    start_worker: WorkerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a producer whose Redis is unreachable
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    dead = QueueClient(ArqRedis(host="127.0.0.1", port=dead_port), service.queue.queue_name)
    cut_off = JobService(service.settings, service.store, dead)
    items = [ItemSpec.from_request(parse_job_request(prompt(f"saved {i}"))) for i in range(3)]

    # When it submits a batch, then the jobs are saved but not queued
    created = await BatchService(cut_off).create(items, owner_key_id=None)
    await dead.close()
    assert (created.created, created.enqueued) == (3, 0)
    assert await service.queue.redis.zcard(service.queue.queue_name) == 0

    # And the reconciler, once they are past its grace period, queues them
    real_now = clock.now
    monkeypatch.setattr(clock, "now", lambda: real_now() + timedelta(seconds=30))
    reconciler = Reconciler(service.store, service.queue, marker_ttl_s=60)
    assert await reconciler.run_once() == 3
    monkeypatch.setattr(clock, "now", real_now)
    assert await service.queue.redis.zcard(service.queue.queue_name) == 3

    # So a worker runs them all
    await start_worker()
    batches = BatchService(service)
    ids = [job_id async for job_id in batches.job_ids(created.batch.id)]
    await wait_terminal(service.store, ids)
    assert (await batches.get(created.batch.id, owned_by=None)).counts.succeeded == 3
    assert fake_llm.stats.total_requests == 3


@given(
    items=st.lists(
        json_values
        | job_like
        | plausible_jobs
        | plausible_jobs.map(lambda job: {**job, "custom_id": "c\x00"}),
        min_size=1,
        max_size=4,
    ),
    models=st.none() | st.lists(any_text(max_size=10), max_size=3),
)
@example(items=[prompt("big", params={"seed": 2**70}), {"kind": 2**64}], models=None)
@hypothesis_settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
async def test_arbitrary_batches_never_cause_a_server_error(
    admin: Client, items: list[Any], models: list[str] | None
) -> None:
    # Given any JSON values as the items of a batch, when they are uploaded
    params = [("model", m) for m in models or []]
    async with admin.post(
        "/api/batches", params=params, data=jsonl(items), headers=NDJSON
    ) as response:
        body = await response.json()
    # Then the batch is created, or refused with a 4xx in the one error shape
    if response.status == 201:  # (examples share a database: a key may be reused)
        assert body["created"] + body["reused"] >= 1 and body["total"] == body["created"]
    elif response.status == 200:  # an example sent again: its earlier batch
        assert body["created"] == 0 and body["reused"] == body["total"] >= 1
    else:
        assert 400 <= response.status < 500, body
        assert body["error"]["code"] and body["error"]["message"]


async def test_finished_batches_are_marked_in_sql_without_being_read(
    admin: Client, service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given a batch that ran to its end, and one whose cancel has just stopped its last job,
    # neither read since: their rows still say in_progress and cancelling
    async with admin.post("/api/batches", json={"jobs": [prompt("a"), prompt("b")]}) as r:
        done = await r.json()
    async with admin.post("/api/batches", json={"jobs": [prompt("c")]}) as r:
        stopped = await r.json()
    await start_worker(reconcile_interval_s=3600)  # its reconciler passes once, at start
    jobs = await service.store.list_jobs(batch_id=done["id"], limit=10)
    await wait_terminal(service.store, [job.id for job in jobs])
    async with service.store.sessionmaker() as session, session.begin():
        await session.execute(
            update(Job).where(Job.batch_id == stopped["id"]).values(status="cancelled")
        )
        await session.execute(
            update(Batch).where(Batch.id == stopped["id"]).values(status="cancelling")
        )

    async def row(batch_id: str) -> Batch:
        async with service.store.sessionmaker() as session:
            found = await session.get(Batch, batch_id)
            assert found is not None
            return found

    assert (await row(done["id"])).status == "in_progress"

    # When the reconciler passes
    await Reconciler(service.store, service.queue, marker_ttl_s=60).run_once()

    # Then the rows say how they ended, the first when its last job did
    finished = [await service.store.get_job(job.id) for job in jobs]
    last_end = max(job.finished_at for job in finished if job is not None and job.finished_at)
    completed, cancelled = await row(done["id"]), await row(stopped["id"])
    assert (completed.status, completed.completed_at) == ("completed", last_end)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
    assert (await get_batch(admin, done["id"]))["status"] == "completed"
