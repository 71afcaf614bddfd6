"""A camera password given in the stream URL is sealed end to end: after a full run (start, a
restart of the runner, shutdown) it is found in clear nowhere: not in Postgres, not in any Kafka
record of any topic, not in Temporal (history, memo, search attributes), the logs, S3, the API's
answers or the metrics. And a rotation of the secret key keeps a running stream running."""

from __future__ import annotations

import json
import logging
import os
import signal
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from core.sealing import UrlSealer, generate_key, seal_stored_urls
from core.settings import Settings, settings_env
from core.storage import create_s3_client
from core.temporal import connect_temporal, workflow_id
from deploy.camera.control import TestCamera
from tests.e2e.healing import healing_pipeline
from tests.ports import free_port
from tests.service_processes import wait_for_metrics

pytestmark = pytest.mark.e2e


def credentialed(camera: TestCamera, mount: str, secret: str) -> str:
    return camera.url(mount).replace("rtsp://", f"rtsp://operator:{secret}@")


async def kafka_text(settings: Settings) -> str:
    """Every record of every topic of the pipeline, keys, values and headers, as one text."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=settings.kafka_max_request_size,
    )
    await consumer.start()
    parts: list[bytes] = []
    try:
        topics = [
            settings.topic_commands,
            settings.topic_frames,
            settings.topic_states,
            settings.topic_dead_letter,
        ]
        tps = await all_partitions(settings, topics)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        for _ in range(30):
            batch = await consumer.getmany(timeout_ms=300)
            if not batch:
                break
            for records in batch.values():
                for r in records:
                    parts += [r.key or b"", r.value or b"", *(v for _, v in r.headers)]
    finally:
        await consumer.stop()
    assert parts, "no records read"
    return b"\n".join(parts).decode(errors="replace")


async def all_partitions(settings: Settings, topics: list[str]) -> list[TopicPartition]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return [TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"]]


async def postgres_text(db: asyncpg.Pool) -> str:
    tables = [
        r["tablename"] for r in await db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    ]
    rows = []
    for table in tables:
        rows += [r[0] for r in await db.fetch(f'SELECT t::text FROM "{table}" t')]
    # payloads are bytes; other tests' rows in a shared database may hold any bytes (NUL included)
    payloads = [bytes(r[0]).decode(errors="replace") for r in await db.fetch("SELECT payload FROM outbox")]
    return "\n".join(rows + payloads)


async def temporal_text(settings: Settings, stream_id: str) -> str:
    client = await connect_temporal(settings)
    parts = []
    async for execution in client.list_workflows(f'WorkflowId = "{workflow_id(stream_id)}"'):
        handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
        description = await handle.describe()
        parts.append((await handle.fetch_history()).to_json())
        parts.append(json.dumps(await description.memo(), default=str))
        parts.append(str(description.typed_search_attributes))
    assert parts, "no workflow found"
    return "\n".join(parts)


def s3_text(settings: Settings, stream_id: str) -> str:
    s3 = create_s3_client(settings)
    parts = []
    for item in s3.list_objects(settings.s3_bucket_frames, prefix=f"streams/{stream_id}/", recursive=True):
        assert item.object_name is not None
        stat = s3.stat_object(settings.s3_bucket_frames, item.object_name)
        parts.append(item.object_name + json.dumps(dict(stat.metadata or {})))
    assert parts, "no frames stored"
    return "\n".join(parts)


async def test_a_camera_password_is_found_in_clear_nowhere_after_a_full_run(
    settings: Settings,
    db_pool: asyncpg.Pool,
    camera: TestCamera,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = f"s3cr3t-{uuid.uuid4().hex[:10]}"
    ports = {"metrics_port_runner": free_port(), "metrics_port_ml": free_port()}
    async with healing_pipeline(settings, db_pool, tmp_path, **ports) as healing:
        stream_id = await healing.start_stream(credentialed(camera, "cam1", secret))
        broken = datetime.now(UTC)
        os.kill(healing.pid_of("lookout-runner"), signal.SIGKILL)  # the restart path carries it too
        await healing.wait_for_rows(stream_id, after=broken, timeout_s=60)

        answers = [
            (await healing.api.get(path)).text
            for path in (f"/state/{stream_id}", "/streams", f"/detection_result?id={stream_id}", "/keys", "/")
        ]
        metrics = [(await healing.api.get("/metrics")).text]
        for port in ports.values():  # the restarted runner serves its metrics once it runs the stream
            scraped = await wait_for_metrics(port, lambda m: stream_id in m.text)
            metrics.append(scraped.text)
        view, _ = await healing.shut_down(stream_id)
        assert view["state"] == "inactive"
        s = healing.settings
        places = {
            "Postgres": await postgres_text(db_pool),
            "Kafka": await kafka_text(s),
            "Temporal": await temporal_text(s, stream_id),
            "S3": s3_text(s, stream_id),
            "API answers": "\n".join(answers),
            "metrics": "\n".join(metrics),
            "service logs": "\n".join(svc.log_path.read_text() for svc in healing.supervisor.services),
            "in-process logs": caplog.text,
        }
    assert (
        stream_id in places["Postgres"] and stream_id in places["Kafka"] and stream_id in places["Temporal"]
    )
    leaks = [where for where, text in places.items() if secret in text]
    assert leaks == [], f"the camera password is in clear in: {leaks}"


async def test_rotating_the_secret_key_keeps_a_running_stream_running(
    settings: Settings, db_pool: asyncpg.Pool, camera: TestCamera, tmp_path: Path
) -> None:
    async with healing_pipeline(settings, db_pool, tmp_path) as healing:
        stream_id = await healing.start_stream(credentialed(camera, "cam2", "rotate-me"))
        old = healing.settings.secret_key.get_secret_value()
        rotated = healing.settings.model_copy(
            update={
                "secret_key": type(healing.settings.secret_key)(generate_key()),
                "secret_keys_previous": type(healing.settings.secret_key)(old),
            }
        )
        # the services restart with the new key first and the old one as previous ...
        for service in healing.supervisor.services:
            service.env.update(settings_env(rotated))
            rotated_at = datetime.now(UTC)
            os.kill(healing.pid_of(service.name), signal.SIGKILL)
            await healing.wait_for_rows(stream_id, after=rotated_at, timeout_s=60, watch_state=True)
        # ... then the stored URL is sealed anew with the new key, and a restart still opens it
        assert await seal_stored_urls(db_pool, rotated) >= 1
        stored = await db_pool.fetchval("SELECT url_full FROM streams WHERE id = $1", uuid.UUID(stream_id))
        assert UrlSealer(
            rotated.model_copy(update={"secret_keys_previous": type(rotated.secret_key)("")})
        ).open(stored)
        resealed_at = datetime.now(UTC)
        os.kill(healing.pid_of("lookout-runner"), signal.SIGKILL)
        await healing.wait_for_rows(stream_id, after=resealed_at, timeout_s=60, watch_state=True)
        view, _ = await healing.shut_down(stream_id)
        assert view["state"] == "inactive"
