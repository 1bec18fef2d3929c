"""worker.slots.ModelSlots: at most `size` holders; waiters by rank, then arrival order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from worker.slots import ModelSlots, SlotsClosed


async def until(condition: Callable[[], bool]) -> None:
    """Let other tasks run until `condition()` holds (fail after 5 s)."""
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0)


async def test_at_most_size_hold_a_slot_and_waiters_go_by_rank_then_arrival() -> None:
    slots = ModelSlots(2)
    order: list[str] = []
    release = asyncio.Event()

    async def job(name: str, rank: float = 100) -> None:
        async with slots.hold(rank):
            order.append(name)
            assert slots.in_use <= slots.size
            await release.wait()

    holders = [asyncio.create_task(job(n)) for n in ("a", "b")]
    await until(lambda: slots.in_use == 2)
    waiters = [
        asyncio.create_task(job("bulk-1")),
        asyncio.create_task(job("bulk-2")),
        asyncio.create_task(job("interactive", rank=1)),
    ]
    await until(lambda: slots.waiting == 3)
    assert order == ["a", "b"] and slots.in_use == 2

    release.set()
    await asyncio.wait_for(asyncio.gather(*holders, *waiters), timeout=5)
    assert order == ["a", "b", "interactive", "bulk-1", "bulk-2"]
    assert slots.in_use == 0 and slots.waiting == 0


async def test_a_handed_over_slot_lets_the_waiter_run_before_the_holder_goes_on() -> None:
    # The next job's model call starts before the previous job writes its result.
    slots = ModelSlots(1)
    order: list[str] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with slots.hold():
            await release.wait()
        order.append("holder records its result")

    async def send_body() -> None:
        order.append("waiter's request goes out")

    async def waiter() -> None:
        async with slots.hold():
            order.append("waiter calls the model")
            # aiohttp (Python < 3.12) writes a request's body in a task of its own
            sending.append(asyncio.create_task(send_body()))

    sending: list[asyncio.Task[None]] = []
    first = asyncio.create_task(holder())
    await until(lambda: slots.in_use == 1)
    second = asyncio.create_task(waiter())
    await until(lambda: slots.waiting == 1)
    release.set()
    await asyncio.wait_for(asyncio.gather(first, second, *sending), timeout=5)
    assert order == [
        "waiter calls the model",
        "waiter's request goes out",
        "holder records its result",
    ]
    assert slots.in_use == 0


async def test_a_cancelled_waiter_leaves_the_line_and_loses_no_slot() -> None:
    slots = ModelSlots(1)
    hold = asyncio.Event()
    got: list[str] = []

    async def job(name: str) -> None:
        async with slots.hold():
            got.append(name)
            await hold.wait()

    first = asyncio.create_task(job("first"))
    await until(lambda: slots.in_use == 1)
    doomed = asyncio.create_task(job("doomed"))
    last = asyncio.create_task(job("last"))
    await until(lambda: slots.waiting == 2)

    doomed.cancel()
    hold.set()
    await asyncio.wait_for(asyncio.gather(first, last), timeout=5)
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert got == ["first", "last"] and slots.in_use == 0


async def test_a_waiter_cancelled_as_it_is_handed_a_slot_passes_it_on() -> None:
    slots = ModelSlots(1)
    got: list[str] = []

    async def job(name: str) -> None:
        async with slots.hold():
            got.append(name)

    async with slots.hold():
        handed = asyncio.create_task(job("handed"))
        after = asyncio.create_task(job("after"))
        await until(lambda: slots.waiting == 2)
        # Leaving the block hands the slot to `handed`, which is cancelled before it runs.
        asyncio.get_running_loop().call_soon(handed.cancel)
    await asyncio.wait_for(after, timeout=5)
    with pytest.raises(asyncio.CancelledError):
        await handed
    assert got == ["after"] and slots.in_use == 0


def test_a_worker_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ModelSlots(0)


async def test_closing_turns_waiters_away_and_lets_holders_finish() -> None:
    slots = ModelSlots(1)
    finish = asyncio.Event()
    done: list[str] = []

    async def job(name: str) -> None:
        async with slots.hold():
            await finish.wait()
            done.append(name)

    holder = asyncio.create_task(job("holder"))
    await until(lambda: slots.in_use == 1)
    waiter = asyncio.create_task(job("waiter"))
    await until(lambda: slots.waiting == 1)

    slots.close()
    with pytest.raises(SlotsClosed):
        await asyncio.wait_for(waiter, timeout=5)
    with pytest.raises(SlotsClosed):
        async with slots.hold():
            pass  # pragma: no cover - never entered
    finish.set()
    await asyncio.wait_for(holder, timeout=5)
    assert done == ["holder"] and slots.in_use == 0


async def test_a_job_past_its_slot_is_finishing_until_it_ends() -> None:
    slots = ModelSlots(1)
    released: list[int] = []
    slots.on_release = lambda: released.append(slots.finishing)
    recorded = asyncio.Event()

    async def job() -> None:
        async with slots.hold():
            assert slots.finishing == 0  # at the model
        await recorded.wait()  # recording its outcome

    task = asyncio.create_task(job())
    await until(lambda: bool(released))
    assert released == [1]  # the worker hears of it once the job counts as finishing
    assert slots.finishing == 1 and slots.in_use == 0
    recorded.set()
    await asyncio.wait_for(task, timeout=5)
    assert slots.finishing == 0


async def test_a_slot_taken_ahead_is_held_by_the_block_or_given_back_once() -> None:
    slots = ModelSlots(1)
    released: list[int] = []
    slots.on_release = lambda: released.append(slots.in_use)

    # taken ahead, then held: the block uses that slot, it does not wait for a second one
    ticket = await slots.take()
    assert slots.in_use == 1 and not slots.wanted()
    async with asyncio.timeout(5), slots.hold(ticket=ticket):
        assert slots.in_use == 1
    assert slots.in_use == 0
    slots.give_back(ticket)  # the block took it over: nothing left to give back
    assert slots.in_use == 0 and released == [0]

    # taken ahead and given back (the job went back to the queue): the waiter gets it
    ticket = await slots.take()
    waiter = asyncio.create_task(slots.take(rank=5))
    await until(slots.wanted)
    slots.give_back(ticket)
    slots.give_back(ticket)
    second = await asyncio.wait_for(waiter, timeout=5)
    assert slots.in_use == 1 and not slots.wanted()
    slots.give_back(second)
    assert slots.in_use == 0 and released == [0, 1, 0]


async def test_wanted_can_leave_out_the_jobs_that_wait_for_the_same_thing() -> None:
    # A job waiting on a model's limits gives its slot up only to a job of another model
    slots = ModelSlots(1)
    ticket = await slots.take(tag="model-a")
    same = asyncio.create_task(slots.take(tag="model-a"))
    await until(slots.wanted)
    assert not slots.wanted(excluding="model-a")

    other = asyncio.create_task(slots.take(tag="model-b"))
    await until(lambda: slots.waiting == 2)
    assert slots.wanted(excluding="model-a") and slots.wanted()

    slots.close()
    await asyncio.gather(same, other, return_exceptions=True)
    slots.give_back(ticket)
