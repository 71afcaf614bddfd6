"""A stream requested while the broker is down starts once the broker is back: no outbox row is lost."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from core.kafka import ensure_topics
from core.settings import Settings
from tests.observing import eventually
from tests.participants import running_participants
from tests.running_services import (
    RestartableServer,
    isolated_settings,
    private_broker,
    running_lifecycle,
    wait_for_state,
)
from tests.workflows.lifecycle.conftest import ACK_DEADLINE_S

pytestmark = pytest.mark.integration


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[RestartableServer]:
    server = private_broker(tmp_path)
    await server.start_async()
    try:
        yield server
    finally:
        await server.stop_async()


async def test_init_while_the_broker_is_down_starts_the_stream_once_the_broker_is_back(
    settings: Settings, db_pool: asyncpg.Pool, broker: RestartableServer
) -> None:
    on_private = await isolated_settings(
        settings, kafka_bootstrap=broker.address, ack_deadline_s=ACK_DEADLINE_S
    )
    async with (
        running_participants(on_private),
        running_lifecycle(on_private, publish_timeout_s=1.5, max_backoff_s=1.0) as stack,
    ):
        await broker.stop_async()
        response = await stack.api.post(
            "/init", json={"url": f"rtsp://camera.test/outage/{uuid.uuid4().hex[:8]}"}
        )
        assert response.status_code == 202
        stream_id = response.json()["id"]

        async def publish_failed() -> bool:
            rows = await db_pool.fetch("SELECT sent_at, attempts FROM outbox WHERE key = $1", stream_id)
            return len(rows) == 2 and all(r["sent_at"] is None and r["attempts"] >= 1 for r in rows)

        await eventually(publish_failed, timeout_s=30)
        await broker.start_async()
        await ensure_topics(on_private, [on_private.topic_commands, on_private.topic_states])

        await wait_for_state(stack.api, stream_id, "ml_started", timeout_s=60)
        await stack.api.post("/shutdown", json={"id": stream_id})
        view = await wait_for_state(stack.api, stream_id, {"inactive", "inactive_error"}, timeout_s=30)
        assert view["state"] == "inactive", view
