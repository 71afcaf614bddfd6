"""``lookout-outbox-relay`` serves the outbox backlog and its publish counts on its metrics port."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import pytest
from pydantic import SecretStr

from core.kafka import ensure_topics
from core.outbox import OutboxMessage, enqueue
from core.settings import Settings
from deploy import servers
from tests.running_services import private_broker
from tests.service_processes import MetricSamples, running_service, wait_for_metrics

pytestmark = pytest.mark.integration

ROWS = 3


def counted(scraped: MetricSamples, name: str) -> float:
    return scraped.value(name) or 0


async def test_outbox_backlog_grows_while_the_broker_is_down_and_returns_to_zero_once_published(
    settings: Settings, private_database: str, tmp_path: Path
) -> None:
    port = servers.free_port()
    broker = private_broker(tmp_path)  # its port is chosen now; it starts later
    relay_settings = settings.model_copy(
        update={
            "database_url": SecretStr(private_database),
            "kafka_bootstrap": broker.address,
            "metrics_port_relay": port,
        }
    )
    try:
        async with running_service("lookout-outbox-relay", relay_settings) as relay:
            await wait_for_metrics(port, lambda m: m.value("lookout_outbox_backlog") == 0, service=relay)

            conn = await asyncpg.connect(private_database)
            try:
                topic, key = f"test.metrics.{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
                await enqueue(
                    conn,
                    [
                        OutboxMessage(topic, key, f"row {i}".encode(), f"test:{uuid.uuid4()}")
                        for i in range(ROWS)
                    ],
                )
            finally:
                await conn.close()
            await wait_for_metrics(
                port,
                lambda m: (
                    m.value("lookout_outbox_backlog") == ROWS
                    and counted(m, "lookout_outbox_publish_failures_total") >= ROWS
                ),
                service=relay,
            )

            await broker.start_async()
            await ensure_topics(relay_settings, [topic], partitions=1)  # topics are made, never auto-created
            scraped = await wait_for_metrics(
                port, lambda m: m.value("lookout_outbox_backlog") == 0, service=relay, timeout_s=40
            )
            assert counted(scraped, "lookout_outbox_published_total") == ROWS

            assert await relay.terminate() == 0
    finally:
        await broker.stop_async()
