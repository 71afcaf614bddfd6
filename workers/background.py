"""Tasks a service starts and does not await where it starts them (a stop's acknowledgement, a
dead-letter copy, an error report): kept referenced until done, and awaited all together when the
service shuts down."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class BackgroundTasks:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` as a task of its own."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def finish(self, timeout_s: float | None = None) -> int:
        """Wait for every task still running (their errors were theirs to log); after ``timeout_s``
        cancel those left (e.g. a publish to a broker that is gone). Returns how many were cancelled."""
        if not self._tasks:
            return 0
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)
