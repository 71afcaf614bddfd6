"""``ConsumerLagReporter`` turns a real consumer's highwater and position into the lag gauge."""

from __future__ import annotations

import uuid

import pytest

from core.kafka import ConsumerLagReporter, create_consumer, create_producer, ensure_topics
from core.settings import Settings
from tests.observing import sample

pytestmark = pytest.mark.integration

RECORDS = 10


async def test_consumer_lag_is_the_records_not_yet_handed_to_the_service_and_drops_to_zero(
    settings: Settings,
) -> None:
    topic, group = f"test.lag.{uuid.uuid4().hex[:8]}", f"test-lag-{uuid.uuid4().hex[:8]}"
    own = settings
    await ensure_topics(own, [topic], partitions=1)
    producer = create_producer(own)
    await producer.start()
    try:
        for i in range(RECORDS):
            await producer.send_and_wait(topic, f"record {i}".encode(), key=b"k")
    finally:
        await producer.stop()

    consumer = create_consumer(own, topic, group_id=group)
    await consumer.start()
    try:
        lag = ConsumerLagReporter(consumer, group, interval_s=0)
        handed = 0
        for _attempt in range(10):  # the first fetches may come back empty while the group forms
            handed = sum(len(r) for r in (await consumer.getmany(timeout_ms=2000, max_records=3)).values())
            if handed:
                break
        await lag.update()
        assert lag.lag == {topic: RECORDS - handed}
        assert sample("lookout_consumer_lag", group=group, topic=topic) == RECORDS - handed > 0

        for _attempt in range(10):
            handed += sum(len(r) for r in (await consumer.getmany(timeout_ms=2000)).values())
            if handed == RECORDS:
                break
        await lag.update()
        assert sample("lookout_consumer_lag", group=group, topic=topic) == 0
    finally:
        await consumer.stop()
