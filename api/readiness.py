"""Checks behind ``/readyz``: can the API reach Postgres, the broker and Temporal right now."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any

import asyncpg
from aiokafka import AIOKafkaClient
from temporalio.client import Client

from core.settings import Settings
from core.temporal import connect_temporal
from core.timeouts import within

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 3.0


class TemporalConnection:
    """A Temporal client made on first use, so the API starts while Temporal is still down."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._client: Client | None = None
        self._lock = asyncio.Lock()

    async def client(self) -> Client:
        async with self._lock:
            if self._client is None:
                self._client = await connect_temporal(self._settings)
            return self._client


async def check_postgres(pool: asyncpg.Pool) -> None:
    await pool.fetchval("SELECT 1", timeout=CHECK_TIMEOUT_S)


async def check_kafka(settings: Settings) -> None:
    """Fetch the cluster metadata with a short-lived client (the API itself never publishes)."""
    client = AIOKafkaClient(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id="lookout-api-readyz",
        request_timeout_ms=int(CHECK_TIMEOUT_S * 1000),
    )
    try:
        await client.bootstrap()
    finally:
        await client.close()


async def check_temporal(temporal: TemporalConnection) -> None:
    client = await temporal.client()
    healthy = await client.service_client.check_health(timeout=timedelta(seconds=CHECK_TIMEOUT_S))
    if not healthy:
        raise RuntimeError("Temporal reports not serving")


async def run_check(name: str, check: Coroutine[Any, Any, None]) -> str:
    """``ok`` or the error's type; details go to the log, never to the response."""
    try:
        await within(check, CHECK_TIMEOUT_S + 1)
    except Exception as err:
        log.warning("readiness check failed", extra={"check": name, "error": repr(err)})
        return f"error: {type(err).__name__}"
    return "ok"
