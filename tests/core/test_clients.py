"""The shared clients of core/ against the real servers: Postgres, the broker, S3 and Temporal."""

from __future__ import annotations

import asyncio
import os
import uuid
from datetime import timedelta

import asyncpg
import httpx
import pytest
from alembic.script import ScriptDirectory
from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import Worker

from core.db import alembic_config
from core.kafka import create_consumer, create_producer, ensure_topics
from core.settings import Settings
from core.storage import create_s3_client, ensure_bucket, presigned_get
from core.temporal import connect_temporal
from core.timeouts import within

pytestmark = pytest.mark.integration


async def test_migrated_schema_has_every_table_and_the_frame_uniqueness(db_pool: asyncpg.Pool) -> None:
    tables = {
        r["tablename"]
        for r in await db_pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
    }
    expected = {"streams", "outbox", "stream_events", "detections", "alembic_version", "api_keys"}
    assert expected | {"events", "stream_analytics", "webhook_deliveries"} <= tables
    head = ScriptDirectory.from_config(alembic_config("postgresql://unused/x")).get_current_head()
    assert head == "0008"
    assert await db_pool.fetchval("SELECT version_num FROM alembic_version") == head

    stream_id = uuid.uuid4()
    await db_pool.execute(
        "INSERT INTO streams (id, url_redacted, url_full, state) VALUES ($1, 'rtsp://h/x', 'rtsp://h/x', 'init_startup')",
        stream_id,
    )
    insert = (
        "INSERT INTO detections (stream_id, frame_seq, capture_time, s3_key, width, height, objects)"
        " VALUES ($1, 7, '2026-12-01T10:00:00Z', 'k', 640, 480, $2)"
    )
    await db_pool.execute(insert, stream_id, [{"class": "person"}])
    with pytest.raises(asyncpg.UniqueViolationError):
        await db_pool.execute(insert, stream_id, [])
    assert await db_pool.fetchval("SELECT objects FROM detections WHERE stream_id=$1", stream_id) == [
        {"class": "person"}
    ]


async def test_outbox_insert_notifies_listeners(db_pool: asyncpg.Pool) -> None:
    got: asyncio.Queue[str] = asyncio.Queue()

    def on_notify(_conn: object, _pid: int, channel: str, _payload: str) -> None:
        got.put_nowait(channel)

    async with db_pool.acquire() as conn:
        await conn.add_listener("lookout_outbox", on_notify)
        row = None
        try:
            row = await db_pool.fetchval(
                "INSERT INTO outbox (topic, key, payload) VALUES ('t', 'k', '\\x00') RETURNING id"
            )
            assert await within(got.get(), 5) == "lookout_outbox"
        finally:
            await conn.remove_listener("lookout_outbox", on_notify)
            # the session's relays would try this row for ever: it is no message of Lookout's
            if row is not None:
                await db_pool.execute("DELETE FROM outbox WHERE id = $1", row)


async def test_kafka_keyed_message_is_consumed_committed_and_a_restarted_consumer_resumes_after_it(
    settings: Settings,
) -> None:
    topic = f"test.clients.{uuid.uuid4().hex[:8]}"
    group = f"group-{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [topic], partitions=1)
    producer = create_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"first", key=b"stream-1")
    finally:
        await producer.stop()

    consumer = create_consumer(settings, topic, group_id=group)
    await consumer.start()
    try:
        record = await within(consumer.getone(), 30)
        assert (record.key, record.value) == (b"stream-1", b"first")
        await consumer.commit()
    finally:
        await consumer.stop()

    producer = create_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"second", key=b"stream-1")
    finally:
        await producer.stop()

    consumer = create_consumer(settings, topic, group_id=group)
    await consumer.start()
    try:
        record = await within(consumer.getone(), 30)
        assert record.value == b"second", "a restarted consumer must resume after the committed offset"
    finally:
        await consumer.stop()


async def test_s3_object_round_trips_through_a_presigned_url_and_a_tampered_one_is_refused(
    settings: Settings,
) -> None:
    client = create_s3_client(settings)
    bucket = "lookout-test-clients"
    await asyncio.to_thread(ensure_bucket, client, bucket)
    await asyncio.to_thread(ensure_bucket, client, bucket)  # idempotent
    body = os.urandom(200 * 1024)
    key = f"objects/{uuid.uuid4().hex}.bin"

    import io

    await asyncio.to_thread(client.put_object, bucket, key, io.BytesIO(body), len(body))
    url = presigned_get(client, bucket, key, 600)
    async with httpx.AsyncClient() as http:
        response = await http.get(url)
        assert response.status_code == 200
        assert response.content == body
        signature = url.rsplit("X-Amz-Signature=", 1)[1][:64]
        tampered = url.replace(signature, ("0" if signature[0] != "0" else "1") + signature[1:])
        refused = await http.get(tampered)
        assert refused.status_code == 403
        assert b"SignatureDoesNotMatch" in refused.content


@workflow.defn(sandboxed=False)
class CounterWorkflow:
    """A tiny workflow proving start, signal and query against the dev server."""

    def __init__(self) -> None:
        self.total = 0
        self.done = False

    @workflow.run
    async def run(self, start: int) -> int:
        self.total += start  # a signal delivered with the start is applied before run()
        await workflow.wait_condition(lambda: self.done)
        return self.total

    @workflow.signal
    def add(self, amount: int) -> None:
        self.total += amount

    @workflow.signal
    def finish(self) -> None:
        self.done = True

    @workflow.query
    def current(self) -> int:
        return self.total


async def test_temporal_workflow_is_started_signalled_and_queried_on_the_dev_server(
    settings: Settings,
) -> None:
    client: Client = await connect_temporal(settings)
    queue = f"test-clients-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=queue, workflows=[CounterWorkflow]):
        handle = await client.start_workflow(
            CounterWorkflow.run,
            40,
            id=f"counter-{uuid.uuid4().hex}",
            task_queue=queue,
            execution_timeout=timedelta(minutes=1),
        )
        await handle.signal(CounterWorkflow.add, 2)
        # a query may run before the worker has applied the signal: ask until it has
        for _ in range(50):
            if await handle.query(CounterWorkflow.current) == 42:
                break
            await asyncio.sleep(0.1)
        assert await handle.query(CounterWorkflow.current) == 42
        await handle.signal(CounterWorkflow.finish)
        assert await handle.result() == 42
