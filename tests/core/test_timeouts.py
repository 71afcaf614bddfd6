"""``within`` keeps a cancellation that lands as the awaited thing finishes (3.11's wait_for loses it)."""

from __future__ import annotations

import asyncio
import random

import pytest

from core.timeouts import within


async def _done_at_once() -> int:
    return 1


async def _a_loop_that_waits_with_a_limit_on_every_pass() -> None:
    while True:  # as the consumer-lag reporter does in every service loop
        await within(_done_at_once(), 1)
        await asyncio.sleep(0)


async def test_every_cancel_of_a_loop_awaiting_within_ends_it() -> None:
    lost = 0
    for _ in range(300):
        task = asyncio.create_task(_a_loop_that_waits_with_a_limit_on_every_pass())
        for _ in range(random.randint(1, 20)):  # cancel at some point of a pass
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=0.05)
        if not done:
            lost += 1
            while not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=0.01)
    assert lost == 0, f"{lost} of 300 cancels were lost"


async def test_within_gives_the_result_or_times_out() -> None:
    assert await within(_done_at_once(), 1) == 1
    assert await within(_done_at_once(), None) == 1
    with pytest.raises(TimeoutError):
        await within(asyncio.Event().wait(), 0.05)
