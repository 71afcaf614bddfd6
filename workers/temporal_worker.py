"""The Temporal worker: hosts the StreamLifecycle workflow and its activities (lookout-temporal-worker)."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import asyncpg
from temporalio.client import Client
from temporalio.worker import Worker

from activities.lifecycle import LifecycleActivities
from core.db import create_pool
from core.settings import Settings
from core.temporal import connect_temporal
from workers.entrypoint import run_service
from workflows.stream_lifecycle import StreamLifecycle

log = logging.getLogger(__name__)


def build_worker(client: Client, settings: Settings, pool: asyncpg.Pool) -> Worker:
    """A worker on the lifecycle task queue; ``client`` must use ``core.temporal.DATA_CONVERTER``."""
    activities = LifecycleActivities(pool, settings)
    return Worker(
        client,
        task_queue=settings.temporal_task_queue,
        workflows=[StreamLifecycle],
        activities=[
            activities.load_stream,
            activities.record_state,
            activities.send_command,
            activities.restart_service,
            activities.record_health_event,
        ],
        # on shutdown, let an in-flight activity finish its short transaction instead of abandoning it
        graceful_shutdown_timeout=timedelta(seconds=10),
    )


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run the worker until ``stop`` is set, then let in-flight tasks finish and close the pool."""
    pool = await create_pool(settings)
    try:
        client = await connect_temporal(settings)
        async with build_worker(client, settings, pool):
            log.info("temporal worker started", extra={"task_queue": settings.temporal_task_queue})
            await stop.wait()
        log.info("temporal worker stopped")
    finally:
        await pool.close()


def main() -> None:
    """Console script ``lookout-temporal-worker``."""
    run_service("temporal-worker", serve, metrics_port=lambda s: s.metrics_port_worker)
