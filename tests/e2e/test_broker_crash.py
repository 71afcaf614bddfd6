"""kill -9 of the broker under running streams: Kafka as `stack up` runs it, the real model and camera.

After the broker's restart both streams store rows again, a new stream reaches ``ml_started``, no
outbox row stays unsent and every state event the outbox published is on the states topic.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from core.settings import Settings
from deploy.camera.control import TestCamera
from tests.e2e.pipeline import TERMINAL, Pipeline, pipeline_settings, running_pipeline
from tests.e2e.test_pipeline import start_running_stream
from tests.observing import consume, eventually
from tests.running_services import StackBroker, stack_broker, wait_for_state

pytestmark = pytest.mark.e2e

log = logging.getLogger(__name__)


@pytest.fixture
async def broker(tmp_path: Path, settings: Settings) -> AsyncIterator[StackBroker]:
    with stack_broker(tmp_path / "stack", settings) as running:
        yield running


async def rows_captured_after(db: asyncpg.Pool, stream_id: str, after: datetime) -> int:
    """Detection rows of frames read from the camera after ``after``."""
    value = await db.fetchval(
        "SELECT count(*) FROM detections WHERE stream_id = $1::uuid AND capture_time > $2", stream_id, after
    )
    return int(value)


async def test_broker_killed_with_two_streams_running_both_store_rows_again_and_no_state_event_is_lost(
    broker: StackBroker, camera: TestCamera, db_pool: asyncpg.Pool
) -> None:
    settings = await pipeline_settings(broker.settings, startup_deadline_s=45.0)
    async with running_pipeline(settings) as pipeline:
        streams = [(await start_running_stream(pipeline, camera.url(m)))[0] for m in ("cam1", "cam2")]
        started = datetime.now(UTC)
        for stream_id in streams:
            await eventually(lambda s=stream_id: rows_captured_after(db_pool, s, started), 30)

        killed_at = time.monotonic()
        await asyncio.to_thread(broker.kill_9)
        await asyncio.sleep(2)
        await asyncio.to_thread(broker.restart)
        restarted = datetime.now(UTC)
        recovered: dict[str, float] = {}

        async def stored_again() -> bool:
            for s in streams:
                if s not in recovered and await rows_captured_after(db_pool, s, restarted):
                    recovered[s] = time.monotonic() - killed_at
            return len(recovered) == len(streams)

        await eventually(stored_again, 90, 0.2)
        log.info("first row of a frame captured after the restart, seconds after kill -9: %s", recovered)
        for s in streams:
            view = (await pipeline.api.get(f"/state/{s}")).json()
            assert view["state"] == "ml_started", view

        new_stream, _ = await start_running_stream(pipeline, camera.url("cam3"))
        for stream_id in [*streams, new_stream]:
            response = await pipeline.api.post("/shutdown", json={"id": stream_id})
            assert response.status_code == 202, response.text
        for stream_id in [*streams, new_stream]:
            view = await wait_for_state(pipeline.api, stream_id, TERMINAL, timeout_s=45)
            assert view["state"] == "inactive", view
        await assert_every_outbox_event_is_on_the_states_topic(pipeline, db_pool, [*streams, new_stream])


async def assert_every_outbox_event_is_on_the_states_topic(
    pipeline: Pipeline, db_pool: asyncpg.Pool, stream_ids: list[str]
) -> None:
    settings = pipeline.settings
    unsent = await db_pool.fetchval(
        "SELECT count(*) FROM outbox WHERE key = ANY($1::text[]) AND sent_at IS NULL", stream_ids
    )
    assert unsent == 0
    rows = await db_pool.fetch(
        "SELECT key, payload FROM outbox WHERE key = ANY($1::text[]) AND topic = $2", stream_ids,
        settings.topic_states,
    )  # fmt: skip
    published = {s: {json.loads(r["payload"])["event_id"] for r in rows if r["key"] == s} for s in stream_ids}

    def on_topic(records: list) -> dict[str, set[str]]:  # type: ignore[type-arg]
        found: dict[str, set[str]] = {s: set() for s in stream_ids}
        for record in records:
            key = (record.key or b"").decode()
            if key in found:
                found[key].add(json.loads(record.value)["event_id"])
        return found

    records = await consume(
        settings,
        settings.topic_states,
        until=lambda rs: all(published[s] <= on_topic(rs)[s] for s in stream_ids),
        timeout_s=60,
    )
    found = on_topic(records)
    counts = {s: (len(published[s]), len(published[s] & found[s])) for s in stream_ids}
    log.info("state events per stream (published by the outbox, found on the topic): %s", counts)
    assert all(published[s] <= found[s] for s in stream_ids), counts
