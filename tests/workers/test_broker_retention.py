"""Retention of the embedded broker's log, on Tansu and SeaweedFS as ``stack up`` runs them.

Without it a partition grows until Tansu can no longer list it within a fetch's wait, and its
consumers at the end get nothing (workers/broker_retention.py).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from minio import Minio

from core.kafka import consumer_group
from core.settings import Settings
from tests.deploy.test_broker_conformance import create_topic, producers
from tests.observing import eventually, sample
from tests.running_services import StackBroker, stack_broker
from tests.service_processes import running_service
from workers.broker_retention import BrokerLogTrimmer, StoredBatch

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[StackBroker]:
    with stack_broker(tmp_path / "stack") as running:
        yield running


async def own_topics(settings: Settings) -> Settings:
    """Settings with topics and consumer groups of this test alone, each topic one partition."""
    tag = uuid.uuid4().hex[:8]
    own = settings.model_copy(
        update={
            "kafka_group_prefix": f"retention-{tag}",
            **{f"topic_{t}": f"retention-{tag}.{t}" for t in ("commands", "frames", "states", "events")},
        }
    )
    for topic in (own.topic_commands, own.topic_frames, own.topic_states, own.topic_events):
        await create_topic(own, name=topic)
    return own


async def produce(settings: Settings, topic: str, count: int, producers_n: int = 1) -> None:
    async with producers(settings, producers_n) as started:

        async def write(n: int) -> None:
            for i in range(n, count, producers_n):
                await started[n].send_and_wait(topic, f"{topic}:{i}".encode(), partition=0)

        await asyncio.gather(*(write(n) for n in range(producers_n)))


async def commit(settings: Settings, role: str, topic: str, offset: int) -> None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=consumer_group(settings, role),
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.commit({tp: offset})
    finally:
        await consumer.stop()


def kept(trimmer: BrokerLogTrimmer) -> Counter[str]:
    return Counter(batch.topic for batch in trimmer.stored())


async def test_retention_drops_old_frames_and_only_what_every_group_read_of_commands_and_states(
    broker: StackBroker,
) -> None:
    own = await own_topics(broker.settings)
    for topic in (own.topic_commands, own.topic_frames, own.topic_states, own.topic_events):
        await produce(own, topic, 20)
    await commit(own, "runner", own.topic_commands, 10)
    await commit(own, "ml", own.topic_commands, 12)
    await commit(own, "state-manager", own.topic_states, 15)

    young = BrokerLogTrimmer(own)  # the default windows: everything here is too young to go
    assert await young.trim_once() == 0

    trimmer = BrokerLogTrimmer(own.model_copy(update={"broker_frames_max_age_s": 0, "broker_retention_s": 0}))
    trimmed = sample("lookout_broker_batches_trimmed_total", topic=own.topic_states)
    assert await trimmer.trim_once() == 20 + 10 + 15
    assert kept(trimmer) == {own.topic_commands: 10, own.topic_states: 5, own.topic_events: 20}
    assert sample("lookout_broker_batches_trimmed_total", topic=own.topic_states) == trimmed + 15

    # the state-manager's group goes on from its commit; what it had not read is all there
    consumer = AIOKafkaConsumer(
        own.topic_states,
        bootstrap_servers=own.kafka_bootstrap,
        group_id=consumer_group(own, "state-manager"),
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    try:
        values: list[bytes] = []
        async with asyncio.timeout(30):
            while len(values) < 5:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    values += [r.value or b"" for r in records]
        assert values == [f"{own.topic_states}:{i}".encode() for i in range(15, 20)]
    finally:
        await consumer.stop()


async def test_a_consumer_at_the_end_of_a_long_partition_gets_new_records_once_it_is_trimmed(
    broker: StackBroker,
) -> None:
    own = await own_topics(broker.settings)
    await produce(own, own.topic_frames, 3000, producers_n=8)
    trimmer = BrokerLogTrimmer(own.model_copy(update={"broker_frames_max_age_s": 0}))
    assert await trimmer.trim_once() == 3000

    consumer = AIOKafkaConsumer(
        bootstrap_servers=own.kafka_bootstrap,
        enable_auto_commit=False,
        fetch_max_wait_ms=own.kafka_fetch_max_wait_ms,
    )
    await consumer.start()
    try:
        tp = TopicPartition(own.topic_frames, 0)
        consumer.assign([tp])
        consumer.seek(tp, 3000)
        await produce(own, own.topic_frames, 1)
        async with asyncio.timeout(10):
            while not (batch := await consumer.getmany(timeout_ms=200)):
                pass
        assert [r.offset for records in batch.values() for r in records] == [3000]
    finally:
        await consumer.stop()


async def test_lookout_broker_retention_trims_on_its_own_and_stops_on_sigterm(broker: StackBroker) -> None:
    own = await own_topics(broker.settings)
    own = own.model_copy(
        update={"broker_frames_max_age_s": 1, "broker_trim_interval_s": 0.5, "metrics_port_retention": 0}
    )
    await produce(own, own.topic_frames, 5)
    trimmer = BrokerLogTrimmer(own)
    async with running_service("lookout-broker-retention", own) as service:
        await eventually(lambda: own.topic_frames not in kept(trimmer), timeout_s=30)
        assert await service.terminate() == 0
    assert service.logged("broker log trimmed") and service.logged("broker retention started")
    for line in service.lines:
        assert json.loads(line)["service"] == "broker-retention"


def test_a_batch_goes_only_once_the_commit_is_past_its_last_record(settings: Settings) -> None:
    """Several records in one batch: the batch ends where the next one starts."""
    own = settings.model_copy(update={"broker_retention_s": 0})
    trimmer = BrokerLogTrimmer(own, s3=cast(Minio, object()))
    old = datetime.now(UTC) - timedelta(hours=1)
    states = [
        StoredBatch(own.topic_states, 0, base, f"k{base}", old) for base in (0, 10, 13)
    ]  # 0-9, 10-12, 13-
    assert trimmer.expired(states, {TopicPartition(own.topic_states, 0): 11}) == states[:1]
    assert trimmer.expired(states, {TopicPartition(own.topic_states, 0): 13}) == states[:2]
    assert trimmer.expired(states, {}) == [], "a partition no group committed keeps everything"


def test_frames_ml_has_read_go_after_seconds_and_unread_ones_after_the_maximum_age(
    settings: Settings,
) -> None:
    trimmer = BrokerLogTrimmer(settings, s3=cast(Minio, object()))
    now = datetime.now(UTC)
    frames = [
        StoredBatch(settings.topic_frames, 0, base, f"k{base}", now - timedelta(seconds=age))
        for base, age in ((0, 30), (1, 30), (2, 1), (3, 90), (4, 1))
    ]  # ML has committed 2: frames 0 and 1 were read, 3 is unread but too old
    tp = TopicPartition(settings.topic_frames, 0)
    assert trimmer.expired(frames, {tp: 2}) == [frames[0], frames[1], frames[3]]
    assert trimmer.expired(frames, {}) == [frames[3]]
