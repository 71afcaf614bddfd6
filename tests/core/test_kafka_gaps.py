"""``OffsetGapGuard`` on the stack's broker: it waits at a gap that fills and steps over one that never does.

The gaps are made for real on the broker's storage: the S3 object of one record batch is taken
away (a record Tansu has given an offset but not stored yet) and put back, or left away (an offset
a killed broker handed out and never filled).
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from core.kafka_gaps import OffsetGapGuard
from core.settings import Settings
from core.storage import create_s3_client
from tests.deploy.test_broker_conformance import create_topic, producers
from tests.observing import sample
from tests.running_services import StackBroker, stack_broker
from workers.broker_retention import BrokerLogTrimmer

pytestmark = pytest.mark.integration

RECORDS = 10
WAIT_S = 1.5


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[StackBroker]:
    with stack_broker(tmp_path / "stack") as running:
        yield running


async def write_records(settings: Settings) -> str:
    topic = await create_topic(settings)
    async with producers(settings, 1) as (producer,):
        for i in range(RECORDS):
            await producer.send_and_wait(topic, f"r{i}".encode(), partition=0)
    return topic


def batch_key(settings: Settings, topic: str, offset: int) -> str:
    stored = BrokerLogTrimmer(settings).stored()
    (key,) = [b.key for b in stored if b.topic == topic and b.partition == 0 and b.base_offset == offset]
    return key


def take_away(settings: Settings, key: str) -> bytes:
    s3 = create_s3_client(settings)
    response = s3.get_object(settings.broker_log_bucket, key)
    try:
        data = response.read()
    finally:
        response.close()
        response.release_conn()
    s3.remove_object(settings.broker_log_bucket, key)
    return data


def put_back(settings: Settings, key: str, data: bytes) -> None:
    create_s3_client(settings).put_object(settings.broker_log_bucket, key, io.BytesIO(data), len(data))


async def read_through_guard(
    settings: Settings, topic: str, *, until: int, lossy: bool = False
) -> tuple[list[int], float]:
    """Offsets handed out in order by a guarded consumer from the start, and the seconds it took."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50
    )
    await consumer.start()
    started = time.monotonic()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        guard = OffsetGapGuard(consumer, wait_s=WAIT_S, lossy_topics=frozenset({topic} if lossy else ()))
        offsets: list[int] = []
        async with asyncio.timeout(30):
            while not offsets or offsets[-1] < until:
                for records in (await guard.getmany(timeout_ms=200)).values():
                    offsets += [r.offset for r in records]
        return offsets, time.monotonic() - started
    finally:
        await consumer.stop()


async def test_a_record_still_being_stored_is_waited_for_and_handed_out_in_its_place(
    broker: StackBroker,
) -> None:
    settings = broker.settings
    topic = await write_records(settings)
    key = await asyncio.to_thread(batch_key, settings, topic, 4)
    data = await asyncio.to_thread(take_away, settings, key)
    filled = sample("lookout_kafka_offset_gaps_total", topic=topic, outcome="filled")

    async def store_late() -> None:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(put_back, settings, key, data)

    late = asyncio.create_task(store_late())
    offsets, _ = await read_through_guard(settings, topic, until=RECORDS - 1)
    await late
    assert offsets == list(range(RECORDS))
    assert sample("lookout_kafka_offset_gaps_total", topic=topic, outcome="filled") == filled + 1


async def test_an_offset_never_filled_is_stepped_over_after_the_wait_and_counted(broker: StackBroker) -> None:
    settings = broker.settings
    topic = await write_records(settings)
    key = await asyncio.to_thread(batch_key, settings, topic, 6)
    await asyncio.to_thread(take_away, settings, key)

    offsets, took_s = await read_through_guard(settings, topic, until=RECORDS - 1)
    assert offsets == [o for o in range(RECORDS) if o != 6]
    assert took_s >= WAIT_S, "stepped over the gap without waiting for it"
    assert sample("lookout_kafka_offset_gaps_total", topic=topic, outcome="skipped") == 1


async def test_a_gap_in_a_lossy_topic_such_as_frames_is_stepped_over_at_once(broker: StackBroker) -> None:
    settings = broker.settings
    topic = await write_records(settings)
    key = await asyncio.to_thread(batch_key, settings, topic, 3)
    await asyncio.to_thread(take_away, settings, key)

    offsets, took_s = await read_through_guard(settings, topic, until=RECORDS - 1, lossy=True)
    assert offsets == [o for o in range(RECORDS) if o != 3]
    assert took_s < WAIT_S, "a live frame is not worth waiting for"
    assert sample("lookout_kafka_offset_gaps_total", topic=topic, outcome="skipped") == 1
