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

    async def finish(self) -> None:
        """Wait for every task still running; their errors were theirs to log."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
