"""The embedded broker keeps every record it acknowledged: Apache Kafka as `lookout stack up` runs it.

Everything Lookout promises (outbox, at-least-once, durable lifecycle) rests on these properties, so
they are tested on the broker started from the stack's own recipe: concurrent producers on one
partition, kill -9 of the broker in the middle of producing, frames above 1 MiB, many topics and
partitions, a consumer at the end of a long partition, and the frames topic's retention holding its
bytes on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from core.kafka import create_consumer, create_producer, ensure_topics
from core.settings import Settings
from core.timeouts import within
from tests.observing import eventually
from tests.running_services import StackBroker, stack_broker

pytestmark = pytest.mark.integration

VERIFY_WAIT_MS = 500


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[StackBroker]:
    with stack_broker(tmp_path / "stack") as running:
        yield running


async def create_topic(settings: Settings, partitions: int = 1, name: str | None = None) -> str:
    topic = name or f"conformance-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()
    return topic


@contextlib.asynccontextmanager
async def producers(settings: Settings, count: int, **kwargs: int) -> AsyncIterator[list[AIOKafkaProducer]]:
    started = [create_producer(settings, client_id=f"conformance-{i}", **kwargs) for i in range(count)]
    await asyncio.gather(*(p.start() for p in started))
    try:
        yield started
    finally:
        await asyncio.gather(*(p.stop() for p in started), return_exceptions=True)


async def read_all(
    settings: Settings, topic: str, partitions: int = 1, *, expect: int, quiet_s: float = 5.0
) -> dict[tuple[int, int], bytes]:
    """Every record of ``topic`` by (partition, offset): read until ``expect`` arrived, or nothing new
    came for ``quiet_s``."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=VERIFY_WAIT_MS,
        max_partition_fetch_bytes=settings.kafka_max_request_size,
        fetch_max_bytes=settings.kafka_max_request_size * 2,
    )
    await consumer.start()
    found: dict[tuple[int, int], bytes] = {}
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        last_new = time.monotonic()
        while len(found) < expect and time.monotonic() - last_new < quiet_s:
            batch = await consumer.getmany(timeout_ms=200)
            for tp, records in batch.items():
                for record in records:
                    found[(tp.partition, record.offset)] = record.value or b""
                    last_new = time.monotonic()
    finally:
        await consumer.stop()
    return found


def describe_lost(lost: set[bytes], acked: dict[bytes, int], found: dict[tuple[int, int], bytes]) -> str:
    """Where each lost record should be: its acknowledged offset and what was read there."""
    return "; ".join(
        f"{value.decode()} acked at {acked[value]}, read there {found.get((0, acked[value]))!r}"
        for value in sorted(lost)[:5]
    )


def assert_dense(offsets: list[int], what: str) -> None:
    assert sorted(offsets) == list(range(len(offsets))), f"{what}: offsets not dense from 0"


async def test_concurrent_producers_on_one_partition_keep_every_acknowledged_record(
    broker: StackBroker,
) -> None:
    settings = broker.settings
    topic = await create_topic(settings)
    acked: dict[bytes, int] = {}

    async def produce(producer: AIOKafkaProducer, n: int) -> None:
        for i in range(200):
            value = f"{n}:{i}".encode()
            metadata = await producer.send_and_wait(topic, value, partition=0)
            acked[value] = metadata.offset

    async with producers(settings, 8) as started:
        await asyncio.gather(*(produce(p, n) for n, p in enumerate(started)))

    assert len(acked) == 1600
    distinct = len(set(acked.values()))
    assert distinct == 1600, f"1600 records acknowledged at only {distinct} distinct offsets"
    found = await read_all(settings, topic, expect=1600)
    read_back = {value: offset for (_, offset), value in found.items()}
    lost = set(acked) - set(read_back)
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged records lost ({len(found)} read back): " + (
        describe_lost(lost, acked, found)
    )
    assert read_back == acked, "a record is read back at another offset than it was acknowledged at"
    assert_dense([offset for _, offset in found], topic)


async def test_a_live_consumer_behind_concurrent_producers_gets_every_acknowledged_record_in_order(
    broker: StackBroker,
) -> None:
    """A plain consumer tailing a partition that four producers write sees every acknowledged
    record, in offset order, with no gap to wait at."""
    settings = broker.settings
    topic = await create_topic(settings)
    acked: dict[bytes, int] = {}
    handed: list[tuple[int, bytes]] = []
    produced = asyncio.Event()

    async def produce(producer: AIOKafkaProducer, n: int) -> None:
        for i in range(300):
            value = f"{n}:{i}".encode()
            acked[value] = (await producer.send_and_wait(topic, value, partition=0)).offset

    async def consume() -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50
        )
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            while not (produced.is_set() and len(handed) >= len(acked)):
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    handed.extend((r.offset, r.value or b"") for r in records)
        finally:
            await consumer.stop()

    reader = asyncio.create_task(consume())
    async with producers(settings, 4) as started:
        await asyncio.gather(*(produce(p, n) for n, p in enumerate(started)))
    produced.set()
    await within(reader, 60)
    missed = set(acked) - {value for _, value in handed}
    assert not missed, f"the live consumer missed {len(missed)} of {len(acked)}: {sorted(missed)[:5]}"
    assert [offset for offset, _ in handed] == list(range(len(acked))), "not handed out in offset order"


@dataclass
class _Writer:
    """A producer that keeps writing numbered records, through broker outages, until told to stop."""

    producer: AIOKafkaProducer
    name: str
    acked: dict[bytes, int] = field(default_factory=dict)
    failed: int = 0

    async def run(self, topic: str, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            value = f"{self.name}:{i}".encode()
            i += 1
            try:
                metadata = await self.producer.send_and_wait(topic, value, partition=0)
            except KafkaError:
                self.failed += 1  # not acknowledged: it may or may not be kept
                await asyncio.sleep(0.1)
                continue
            self.acked[value] = metadata.offset


async def test_kill_9_of_the_broker_mid_produce_loses_no_acknowledged_record_and_reuses_no_offset(
    broker: StackBroker,
) -> None:
    settings = broker.settings
    topic = await create_topic(settings)
    group = f"conformance-{uuid.uuid4().hex[:8]}"
    stop = asyncio.Event()
    async with producers(settings, 4, request_timeout_ms=3000) as started:
        writers = [_Writer(p, f"w{n}") for n, p in enumerate(started)]
        tasks = [asyncio.create_task(w.run(topic, stop)) for w in writers]
        await asyncio.sleep(2)

        # a consumer group commits an offset in the middle of what was written so far
        consumer = create_consumer(settings, topic, group_id=group)
        await consumer.start()
        tp = TopicPartition(topic, 0)
        seen = 0
        async with asyncio.timeout(30):
            while seen < 50:
                seen += sum(
                    len(r) for r in (await consumer.getmany(timeout_ms=200, max_records=50 - seen)).values()
                )
        await consumer.commit({tp: 50})
        await consumer.stop()

        await asyncio.to_thread(broker.kill_9)
        before_kill = {value for w in writers for value in w.acked}
        await asyncio.sleep(1)
        await asyncio.to_thread(broker.restart)  # and nothing reads the log before the writers append
        target = {w.name: len(w.acked) + 100 for w in writers}
        await eventually(lambda: all(len(w.acked) >= target[w.name] for w in writers), 90)
        stop.set()
        await asyncio.gather(*tasks)

    acked = {value: offset for w in writers for value, offset in w.acked.items()}
    assert before_kill and len(acked) >= len(before_kill) + 400
    distinct = len(set(acked.values()))
    assert distinct == len(acked), f"{len(acked)} records acknowledged at {distinct} offsets: log rewritten"
    found = await read_all(settings, topic, expect=len(acked) + sum(w.failed for w in writers))
    read_back = {value: offset for (_, offset), value in found.items()}
    lost = set(acked) - set(read_back)
    assert not lost, (
        f"{len(lost)} of {len(acked)} acknowledged records lost across kill -9 ({len(found)} read): "
        + describe_lost(lost, acked, found)
    )
    moved = {v for v, offset in acked.items() if read_back[v] != offset}
    assert not moved, f"{len(moved)} acknowledged records are read back at other offsets"
    # idempotent producers: a batch re-sent after the kill is stored once, so no value is twice
    assert len(set(found.values())) == len(found), "a record was stored twice across the restart"
    assert_dense([offset for _, offset in found], topic)

    # the group resumes from the offset it committed before the kill
    consumer = create_consumer(settings, topic, group_id=group)
    await consumer.start()
    try:
        async with asyncio.timeout(30):
            while not (batch := await consumer.getmany(timeout_ms=200)):
                pass
        first = min(r.offset for records in batch.values() for r in records)
        assert first == 50
    finally:
        await consumer.stop()


async def test_frames_above_one_mebibyte_from_four_producers_are_kept_byte_for_byte(
    broker: StackBroker,
) -> None:
    settings = broker.settings
    topic = await create_topic(settings)
    sent: dict[str, int] = {}

    async def produce(producer: AIOKafkaProducer, n: int) -> None:
        for i in range(10):
            value = os.urandom(1_200_000 + 37 * i)  # a 4K JPEG is of this order
            await producer.send_and_wait(topic, value, key=f"{n}".encode(), partition=0)
            sent[hashlib.sha256(value).hexdigest()] = len(value)

    async with producers(settings, 4) as started:
        await asyncio.gather(*(produce(p, n) for n, p in enumerate(started)))
    found = await read_all(settings, topic, expect=40)
    kept = {hashlib.sha256(value).hexdigest(): len(value) for value in found.values()}
    assert kept == sent
    assert_dense([offset for _, offset in found], topic)


async def test_many_topics_and_partitions_keep_each_record_in_its_partition(broker: StackBroker) -> None:
    settings = broker.settings
    topics = [await create_topic(settings, partitions=6) for _ in range(6)]
    sent: dict[str, dict[tuple[int, int], bytes]] = {t: {} for t in topics}

    async def produce(producer: AIOKafkaProducer, topic: str) -> None:
        for partition in range(6):
            for i in range(15):
                value = f"{topic}/{partition}/{i}".encode()
                metadata = await producer.send_and_wait(topic, value, partition=partition)
                sent[topic][(partition, metadata.offset)] = value

    async with producers(settings, 3) as started:
        await asyncio.gather(*(produce(started[n % 3], t) for n, t in enumerate(topics)))
    for topic in topics:
        found = await read_all(settings, topic, partitions=6, expect=90)
        assert found == sent[topic], f"{topic}: {len(found)} of 90 read back as sent"


async def test_a_consumer_at_the_end_of_a_100000_record_partition_gets_a_new_record_within_100_ms(
    broker: StackBroker,
) -> None:
    settings = broker.settings
    topic = await create_topic(settings)
    producer = create_producer(settings)
    await producer.start()
    try:
        sent = [await producer.send(topic, b"x" * 100, partition=0) for _ in range(100_000)]
        await asyncio.gather(*sent)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        )
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_end(tp)
            assert await consumer.position(tp) == 100_000
            delays = []
            for i in range(20):
                fetch = asyncio.create_task(consumer.getone())
                await asyncio.sleep(0.1)  # the consumer is waiting at the end when the record comes
                started = time.monotonic()
                await producer.send_and_wait(topic, f"new {i}".encode(), partition=0)
                record = await within(fetch, 5)
                delays.append(time.monotonic() - started)
                assert record.offset == 100_000 + i
        finally:
            await consumer.stop()
    finally:
        await producer.stop()
    delays.sort()
    assert delays[len(delays) // 2] < 0.1, f"new records reached the consumer after {delays} s"


def topic_bytes_on_disk(log_dir: Path, topic: str) -> int:
    """Bytes the broker's files of ``topic`` take on disk (allocated blocks: indexes are sparse)."""
    return sum(
        f.stat().st_blocks * 512 for d in log_dir.glob(f"{topic}-*") if d.is_dir() for f in d.iterdir()
    )


async def test_the_frames_topic_stays_within_its_retention_bytes_on_disk_under_4_streams(
    broker: StackBroker,
) -> None:
    """Ten minutes of 4 streams' frames (5 fps, 40 KB a frame), sent twenty times faster than live:
    the topic's files never take more than its declared bytes, and the oldest frames are gone."""
    budget = 384 * 1024 * 1024
    settings = broker.settings.model_copy(
        update={"topic_frames": f"frames-{uuid.uuid4().hex[:8]}", "kafka_frames_retention_bytes": budget}
    )
    await ensure_topics(settings, [settings.topic_frames])
    log_dir = broker.stack.data_dir / "kafka" / "log"
    frame = os.urandom(40_000)
    streams = [str(uuid.uuid4()).encode() for _ in range(4)]
    peak = 0
    producer = create_producer(settings, idempotent=False)
    await producer.start()
    try:
        for _ in range(30):  # 10 minutes of frames in 30 s
            started = time.monotonic()
            await asyncio.gather(
                *[
                    await producer.send(settings.topic_frames, frame, key=key)
                    for _ in range(100)  # 5 fps for 20 s of one stream
                    for key in streams
                ]
            )
            peak = max(peak, topic_bytes_on_disk(log_dir, settings.topic_frames))
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    finally:
        await producer.stop()
    await asyncio.sleep(3)  # the last retention checks
    peak = max(peak, topic_bytes_on_disk(log_dir, settings.topic_frames))
    written = 30 * 100 * 4 * len(frame)
    assert peak <= budget, (
        f"the frames topic took {peak / 2**20:.0f} MiB on disk, above its {budget / 2**20:.0f}"
    )
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(settings.topic_frames, p) for p in range(settings.kafka_partitions)]
        kept_from = await consumer.beginning_offsets(tps)
    finally:
        await consumer.stop()
    assert sum(kept_from.values()) > 0, f"{written / 2**20:.0f} MiB written and no frame deleted"
