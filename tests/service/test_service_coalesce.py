"""TickBatcher: one tick's calls reach one batched call, and every waiter is answered."""

from __future__ import annotations

import asyncio

from service.batcher import TickBatcher


async def test_one_ticks_items_reach_one_call_in_order() -> None:
    calls: list[list[int]] = []

    async def square(items: list[int]) -> list[int]:
        calls.append(items)
        return [i * i for i in items]

    tb: TickBatcher[int, int] = TickBatcher(square)
    assert await asyncio.gather(*(tb(i) for i in range(5))) == [0, 1, 4, 9, 16]
    assert calls == [[0, 1, 2, 3, 4]]
    assert await tb(7) == 49 and calls[-1] == [7]  # a lone call is sent in the next tick


async def test_blocks_run_concurrently_and_fail_alone() -> None:
    running, peak = [0], [0]

    async def run(items: list[int]) -> list[int]:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await asyncio.sleep(0.01)
        running[0] -= 1
        if 13 in items:
            raise ValueError("bad block")
        return items

    tb: TickBatcher[int, int] = TickBatcher(run, parts=2, min_part=8)
    got = await asyncio.gather(*(tb(i) for i in range(16)), return_exceptions=True)
    assert peak[0] == 2
    assert got[:8] == list(range(8))
    assert all(isinstance(g, ValueError) for g in got[8:])


async def test_a_wrong_length_answer_fails_every_waiter() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    tb: TickBatcher[int, int] = TickBatcher(short)
    got = await asyncio.wait_for(
        asyncio.gather(*(tb(i) for i in range(3)), return_exceptions=True), 5
    )
    assert all(isinstance(g, RuntimeError) for g in got)


async def test_drain_sends_the_queued_tick_and_waits() -> None:
    seen: list[list[str]] = []

    async def run(items: list[str]) -> list[None]:
        await asyncio.sleep(0.01)
        seen.append(items)
        return [None] * len(items)

    tb: TickBatcher[str, None] = TickBatcher(run)
    waiter = asyncio.ensure_future(tb("a"))
    await asyncio.sleep(0)  # queued, flush not yet run
    await tb.drain(timeout_s=5)
    assert seen == [["a"]] and waiter.done()


async def test_serial_batcher_sends_what_arrived_during_a_block_as_the_next() -> None:
    """``serial``: one block in flight; calls made while it runs (over several ticks) wait and
    go together as the next block, at once when it ends; a failing block fails only its own."""
    calls: list[list[int]] = []
    running, peak = [0], [0]

    async def run(items: list[int]) -> list[int]:
        calls.append(items)
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await asyncio.sleep(0.02)
        running[0] -= 1
        if -1 in items:
            raise ValueError("bad block")
        return [i * 10 for i in items]

    tb: TickBatcher[int, int] = TickBatcher(run, serial=True)
    first = asyncio.ensure_future(tb(1))
    await asyncio.sleep(0.005)  # the first block is running
    later = []
    for i in (2, 3, 4):
        later.append(asyncio.ensure_future(tb(i)))
        await asyncio.sleep(0)  # separate ticks
    assert await first == 10
    assert await asyncio.gather(*later) == [20, 30, 40]
    assert calls == [[1], [2, 3, 4]] and peak[0] == 1
    # A failure answers its block's waiters and the batcher carries on.
    bad = asyncio.ensure_future(tb(-1))
    await asyncio.sleep(0.005)
    ok = asyncio.ensure_future(tb(5))
    assert isinstance((await asyncio.gather(bad, return_exceptions=True))[0], ValueError)
    assert await ok == 50 and calls[-1] == [5]
    assert await tb(6) == 60  # idle again: a lone call goes in the next tick
