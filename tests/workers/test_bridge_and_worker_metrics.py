"""``lookout-state-bridge`` and ``lookout-temporal-worker`` serve their metrics: the bridge its consumer
lag and event counts, the worker the lifecycle states it records."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from core.kafka import consumer_group, create_producer
from core.messages import EventKind, Service, StateEvent
from core.settings import Settings
from core.states import StreamState
from core.temporal import connect_temporal, workflow_id
from deploy import servers
from tests.running_services import isolated_settings
from tests.service_processes import MetricSamples, running_service, wait_for_metrics

pytestmark = pytest.mark.integration

MALFORMED = [b"{not json", b'{"stream_id": "x"}']


async def publish_states(settings: Settings, *records: tuple[bytes, bytes]) -> None:
    producer = create_producer(settings, client_id="metrics-test")
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(settings.topic_states, value, key=key)
    finally:
        await producer.stop()


async def test_bridge_serves_consumer_lag_and_event_counts_and_the_worker_the_states_it_recorded(
    settings: Settings, db_pool: asyncpg.Pool
) -> None:
    bridge_port, worker_port = servers.free_port(), servers.free_port()
    own = await isolated_settings(settings, metrics_port_bridge=bridge_port, metrics_port_worker=worker_port)
    stream_id = uuid.uuid4()
    await db_pool.execute(
        "INSERT INTO streams (id, url_redacted, url_full, state) VALUES ($1, $2, $2, 'init_startup')",
        stream_id,
        "rtsp://camera.test/metrics",
    )
    accepted = StateEvent(
        stream_id=str(stream_id), service=Service.API, kind=EventKind.PROGRESS, state=StreamState.INIT_STARTUP
    )

    def bridge_caught_up(scraped: MetricSamples) -> bool:
        return (
            scraped.value("lookout_bridge_events_signalled_total") == 1
            and scraped.value("lookout_dead_lettered_total", service="state-bridge", topic=own.topic_states)
            == len(MALFORMED)
            and scraped.value(
                "lookout_consumer_lag", group=consumer_group(own, "state-manager"), topic=own.topic_states
            )
            == 0
        )

    def startup_recorded(scraped: MetricSamples) -> bool:
        return scraped.value("lookout_states_recorded_total", state="in_startup_processing") == 1

    async with (
        running_service("lookout-state-bridge", own) as bridge,
        running_service("lookout-temporal-worker", own) as worker,
    ):
        await publish_states(
            own,
            *((b"k", value) for value in MALFORMED),
            (str(stream_id).encode(), accepted.model_dump_json().encode()),
        )
        scraped = await wait_for_metrics(bridge_port, bridge_caught_up, service=bridge)
        bad = scraped.value("lookout_bad_messages_total", service="state-bridge", topic=own.topic_states)
        assert bad == len(MALFORMED)
        await wait_for_metrics(worker_port, startup_recorded, service=worker)

        client = await connect_temporal(own)
        await client.get_workflow_handle(workflow_id(str(stream_id))).terminate("test cleanup")
        assert await bridge.terminate() == 0
        assert await worker.terminate() == 0
