"""The database workers' fair queue: a share per caller, callers served in turn, bounded waiting (no processes)."""

from __future__ import annotations

import asyncio

import pytest

from servers.database_query.fair_queue import FairQueue, Refused
from servers.database_query.service import Limits


async def waiter(queue: FairQueue, caller: str, order: list[str], hold: asyncio.Event, wait_s: float = 5.0) -> None:
    """Take a slot for ``caller``, note it, hold it until ``hold`` is set."""
    async with queue.slot(caller, wait_s):
        order.append(caller)
        await hold.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_waiting_callers_are_served_in_turn_not_first_come() -> None:
    queue = FairQueue(slots=1, share=1, max_waiting=10, max_waiting_per_caller=10)
    order: list[str] = []
    holds = {name: asyncio.Event() for name in ("a0", "a1", "a2", "a3", "b1")}
    tasks = [asyncio.create_task(waiter(queue, "a", order, holds["a0"]))]
    await settle()
    for name in ("a1", "a2", "a3", "b1"):  # a's three queue before b's one
        tasks.append(asyncio.create_task(waiter(queue, name[0], order, holds[name])))
        await settle()
    assert (queue.active, queue.waiting) == (1, 4)
    for name in ("a0", "a1", "b1", "a2", "a3"):
        holds[name].set()
        await settle()
    await asyncio.gather(*tasks)
    assert order == ["a", "a", "b", "a", "a"]  # after a's second query, b's turn came before a's third
    assert (queue.active, queue.waiting) == (0, 0)


async def test_a_caller_holds_at_most_its_share_and_the_rest_is_left_to_others() -> None:
    queue = FairQueue(slots=3, share=2, max_waiting=10, max_waiting_per_caller=10)
    order: list[str] = []
    hold = asyncio.Event()
    tasks = [asyncio.create_task(waiter(queue, "a", order, hold)) for _ in range(4)]
    await settle()
    assert (queue.running("a"), queue.queued("a"), queue.active) == (2, 2, 2)
    tasks.append(asyncio.create_task(waiter(queue, "b", order, hold)))
    await settle()
    assert queue.running("b") == 1, "the free slot went to the other caller at once"
    hold.set()
    await asyncio.gather(*tasks)
    assert (queue.active, queue.waiting) == (0, 0)


async def test_a_callers_own_queue_is_bounded() -> None:
    queue = FairQueue(slots=1, share=1, max_waiting=10, max_waiting_per_caller=2)
    hold = asyncio.Event()
    tasks = [asyncio.create_task(waiter(queue, "a", [], hold)) for _ in range(3)]
    await settle()
    with pytest.raises(Refused) as refused:
        await queue.acquire("a", 1.0)
    assert refused.value.reason == "caller_share"
    assert "client 'a' already has 1 queries running and 2 waiting" in refused.value.message
    assert "max_waiting_per_caller 2" in refused.value.message
    hold.set()
    await asyncio.gather(*tasks)


async def test_a_full_waiting_room_makes_room_for_a_caller_with_fewer_waiting() -> None:
    queue = FairQueue(slots=1, share=1, max_waiting=2, max_waiting_per_caller=5)
    order: list[str] = []
    hold = asyncio.Event()
    flood = [asyncio.create_task(waiter(queue, "a", order, hold)) for _ in range(3)]
    await settle()
    assert queue.waiting == 2
    other = asyncio.create_task(waiter(queue, "b", order, hold))
    await settle()
    assert (queue.queued("a"), queue.queued("b"), queue.waiting) == (1, 1, 2)
    with pytest.raises(Refused) as full:  # a caller with as many waiting as the most is refused
        await queue.acquire("a", 1.0)
    assert "(max_concurrent_queries, max_waiting_queries)" in full.value.message
    hold.set()
    outcomes = await asyncio.gather(*flood, other, return_exceptions=True)
    dropped = [outcome for outcome in outcomes if isinstance(outcome, Refused)]
    assert len(dropped) == 1 and dropped[0].reason == "caller_share"
    assert "client 'a' had the most queries waiting" in dropped[0].message
    assert sorted(order) == ["a", "a", "b"]
    assert (queue.active, queue.waiting) == (0, 0)


async def test_a_wait_that_times_out_or_is_cancelled_leaves_nothing_behind() -> None:
    queue = FairQueue(slots=1, share=1, max_waiting=10, max_waiting_per_caller=10)
    hold = asyncio.Event()
    holder = asyncio.create_task(waiter(queue, "a", [], hold))
    await settle()
    with pytest.raises(Refused) as late:
        await queue.acquire("b", 0.05)
    assert "stayed busy for 0.05 s" in late.value.message
    cancelled = asyncio.create_task(queue.acquire("c", 5.0))
    await settle()
    assert queue.waiting == 1
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    assert (queue.waiting, queue.active) == (0, 1)
    # Granted and cancelled in the same step: the slot goes on to the next waiter instead of leaking.
    granted = asyncio.create_task(queue.acquire("d", 5.0))
    after = asyncio.create_task(waiter(queue, "e", [], hold))
    await settle()
    hold.set()
    await asyncio.sleep(0)  # the holder releases: d is granted, but has not run yet
    assert queue.running("d") == 1 and not granted.done()
    granted.cancel()
    await asyncio.gather(holder, granted, after, return_exceptions=True)
    assert (queue.waiting, queue.active) == (0, 0)


def test_the_default_share_leaves_a_worker_for_other_callers() -> None:
    assert Limits().caller_share == 3
    assert Limits(max_concurrent_queries=1).caller_share == 1
    assert Limits(max_concurrent_queries=4, max_queries_per_caller=4).caller_share == 4
    with pytest.raises(ValueError, match="max_queries_per_caller"):
        Limits(max_concurrent_queries=2, max_queries_per_caller=3)
