"""Waiting helpers of the long-running workers: exponential backoff and stoppable sleeps."""

from __future__ import annotations

import asyncio
import random


class Backoff:
    """Exponential delays with jitter, from ``first_s`` up to ``max_s``; ``reset`` after a success."""

    def __init__(self, first_s: float = 0.5, max_s: float = 30.0) -> None:
        self._first_s = first_s
        self._max_s = max_s
        self._next_s = first_s

    def next_delay(self) -> float:
        delay = self._next_s
        self._next_s = min(self._next_s * 2, self._max_s)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next_s = self._first_s


async def wait_any(stop: asyncio.Event, other: asyncio.Event | None, timeout_s: float) -> None:
    """Sleep until ``stop`` or ``other`` is set, or ``timeout_s`` has passed."""
    waiters = [asyncio.create_task(stop.wait())]
    if other is not None:
        waiters.append(asyncio.create_task(other.wait()))
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
