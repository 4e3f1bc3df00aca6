"""Turns on a worker: one at a time, grouped by adapter, nobody starved, cancellation safe."""

from __future__ import annotations

import asyncio

import pytest

from outpost.runtime.daemon.turns import Turns


async def _serve(turns: Turns, order: list[str], key: str, name: str) -> None:
    await turns.acquire(key)
    order.append(name)
    await asyncio.sleep(0)
    turns.release()


def _run(arrivals: list[tuple[str, str]], max_run: int) -> tuple[list[str], Turns]:
    async def main() -> tuple[list[str], Turns]:
        turns = Turns(max_run=max_run)
        order: list[str] = []
        await turns.acquire("a")  # the worker is busy with adapter a while the rest arrive
        tasks = [asyncio.create_task(_serve(turns, order, key, name)) for key, name in arrivals]
        await asyncio.sleep(0)
        turns.release()
        await asyncio.gather(*tasks)
        return order, turns
    return asyncio.run(main())


def test_waiters_for_the_applied_adapter_go_first():
    order, turns = _run([("b", "b1"), ("a", "a1"), ("b", "b2"), ("a", "a2")], max_run=8)
    assert order == ["a1", "a2", "b1", "b2"]  # two switches instead of four
    assert turns.jumps == 2


def test_a_run_is_capped_so_other_adapters_are_not_starved():
    arrivals = [("b", "b1")] + [("a", f"a{i}") for i in range(6)]
    order, _ = _run(arrivals, max_run=3)
    assert order.index("b1") == 3  # served after at most max_run jumps


def test_a_cancelled_waiter_leaves_the_queue():
    async def main() -> list[str]:
        turns = Turns()
        order: list[str] = []
        await turns.acquire("a")
        gone = asyncio.create_task(_serve(turns, order, "a", "gone"))
        kept = asyncio.create_task(_serve(turns, order, "b", "kept"))
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        turns.release()
        await asyncio.wait_for(kept, 1.0)
        assert not turns.locked()
        return order
    assert asyncio.run(main()) == ["kept"]


def _run_priorities(arrivals: list[tuple[str, bool]], max_interactive_run: int = 8) -> tuple[list[str], Turns]:
    """Arrivals (name, batch) queue while the worker is busy; the order they are served in."""
    async def main() -> tuple[list[str], Turns]:
        turns = Turns(max_interactive_run=max_interactive_run)
        order: list[str] = []

        async def serve(name: str, batch: bool) -> None:
            await turns.acquire(None, batch)
            order.append(name)
            await asyncio.sleep(0)
            turns.release()

        await turns.acquire(None)
        tasks = [asyncio.create_task(serve(name, batch)) for name, batch in arrivals]
        await asyncio.sleep(0)
        turns.release()
        await asyncio.gather(*tasks)
        return order, turns
    return asyncio.run(main())


def test_interactive_requests_go_ahead_of_batch_ones():
    order, turns = _run_priorities([("b1", True), ("b2", True), ("i1", False), ("b3", True), ("i2", False)])
    assert order == ["i1", "i2", "b1", "b2", "b3"]
    assert turns.overtaken == 2 + 3 and turns.batch_turns == 3 and turns.jumps == 0


def test_batch_requests_still_progress_under_a_stream_of_interactive_ones():
    order, _ = _run_priorities([("b1", True)] + [(f"i{i}", False) for i in range(7)], max_interactive_run=3)
    assert order.index("b1") == 3  # after three interactive turns in a row, the batch one


def test_a_worker_with_slots_holds_that_many_turns_of_one_adapter():
    """A batching worker: up to `slots` requests at once, all for one adapter (llama.cpp
    applies an adapter to the whole batch); another adapter waits for the slots to drain."""
    async def main() -> None:
        turns = Turns()
        turns.slots = 3
        await turns.acquire("a")
        await turns.acquire("a")  # a second slot, at once
        other = asyncio.create_task(turns.acquire("b"))
        await asyncio.sleep(0)
        assert not other.done()  # another adapter: not in this batch
        late = asyncio.create_task(turns.acquire("a"))
        await asyncio.sleep(0)
        assert not late.done()  # queued behind `b`, which waits for the drain: no overtaking
        turns.release()
        await asyncio.sleep(0)
        assert late.done() and not other.done()  # its adapter's run goes on (max_run)
        turns.release()
        turns.release()
        await asyncio.wait_for(other, 1.0)  # drained: the batch switches to b
        assert turns.locked() is False and turns._held == 1
    asyncio.run(main())


def test_full_slots_lock_the_worker():
    async def main() -> None:
        turns = Turns()
        turns.slots = 2
        await turns.acquire(None)
        assert not turns.locked()
        await turns.acquire(None)
        assert turns.locked()
        waiter = asyncio.create_task(turns.acquire(None, batch=True))
        await asyncio.sleep(0)
        assert not waiter.done()
        turns.release()
        await asyncio.wait_for(waiter, 1.0)
        assert turns.locked()
    asyncio.run(main())
