"""The Temporal worker: hosts the StreamLifecycle workflow and its activities (lookout-temporal-worker)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from datetime import timedelta

import asyncpg
from temporalio.client import Client
from temporalio.worker import Worker

from activities.lifecycle import LifecycleActivities
from core.db import create_pool
from core.logs import configure_logging
from core.metrics import start_metrics_server
from core.settings import Settings, get_settings
from core.temporal import connect_temporal
from workflows.stream_lifecycle import StreamLifecycle

log = logging.getLogger(__name__)


def build_worker(client: Client, settings: Settings, pool: asyncpg.Pool) -> Worker:
    """A worker on the lifecycle task queue; ``client`` must use ``core.temporal.DATA_CONVERTER``."""
    activities = LifecycleActivities(pool, settings)
    return Worker(
        client,
        task_queue=settings.temporal_task_queue,
        workflows=[StreamLifecycle],
        activities=[activities.load_stream, activities.record_state, activities.send_command],
        # on shutdown, let an in-flight activity finish its short transaction instead of abandoning it
        graceful_shutdown_timeout=timedelta(seconds=10),
    )


async def serve(settings: Settings) -> None:
    """Run the worker until SIGINT or SIGTERM, then let in-flight tasks finish and close the pool."""
    pool = await create_pool(settings)
    try:
        client = await connect_temporal(settings)
        worker = build_worker(client, settings, pool)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with worker:
            log.info("temporal worker started", extra={"task_queue": settings.temporal_task_queue})
            await stop.wait()
        log.info("temporal worker stopped")
    finally:
        await pool.close()


def main() -> None:
    configure_logging("temporal-worker")
    settings = get_settings()
    start_metrics_server(settings.metrics_port_worker, settings.metrics_host)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings))
