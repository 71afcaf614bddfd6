"""Consumers that never step over a record a concurrent producer is still writing.

Tansu on S3 hands out a record's offset (a conditional write of the partition's watermark) before
it stores the record (a second write). With two producers on one partition, the record at N+1 can
be stored, and fetched, while N is still being written; a consumer then moves past N and never
sees it (measured here: a live consumer behind four producers missed 1 of 1,200 acknowledged
records, which a later read found). Kafka's offsets are dense, so a gap in what a fetch returns is
either such a record on its way or a hole for good: an offset a killed broker handed out and never
filled, or records retention deleted before this consumer read them (workers/broker_retention.py).
``OffsetGapGuard`` holds a partition at the gap (it seeks back and fetches again) until the record
arrives or ``kafka_gap_wait_s`` has passed, then steps over it and counts it.

Frames are the exception (``lossy_topics``): a live frame is worth nothing late, and each stream's
capture process has a producer of its own, so gaps come with every busy frames partition and
holding it would cost a re-fetch per gap. There a gap is stepped over at once, and counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from core.metrics import OFFSET_GAPS

log = logging.getLogger(__name__)

HELD_PAUSE_S = 0.02

Batch = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]


class OffsetGapGuard:
    """``getmany`` for a consumer that hands records out only in offset order, without gaps."""

    def __init__(
        self, consumer: AIOKafkaConsumer, *, wait_s: float, lossy_topics: frozenset[str] = frozenset()
    ) -> None:
        self._consumer = consumer
        self._wait_s = wait_s
        self._lossy_topics = lossy_topics
        self._gaps: dict[tuple[TopicPartition, int], float] = {}  # (partition, offset) -> first seen

    async def getmany(self, *, timeout_ms: int, max_records: int | None = None) -> Batch:
        before = self._assignment()
        expected = self._positions(before)
        batch: Batch = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        if self._assignment() is not before:
            expected = {}  # a rebalance in between: positions start again from the commits
        now = time.monotonic()
        kept: Batch = {}
        for tp, records in batch.items():
            upto = self._in_order(tp, records, expected.get(tp), now)
            if upto:
                kept[tp] = records[:upto]
        self._forget_old(now)
        if batch and not kept:
            await asyncio.sleep(HELD_PAUSE_S)  # every partition waits at a gap: don't spin on fetches
        return kept

    def _assignment(self) -> Any:
        """aiokafka's current assignment; a new object after each rebalance."""
        subscription = self._consumer._subscription.subscription
        return subscription.assignment if subscription is not None else None

    @staticmethod
    def _positions(assignment: Any) -> dict[TopicPartition, int]:
        """The next offset each partition hands out; a partition whose position is being reset has
        none yet and is checked from its first record on."""
        # the non-waiting half of ``AIOKafkaConsumer.position``, which blocks during a reset
        positions = {}
        for tp in assignment.tps if assignment is not None else ():
            state = assignment.state_value(tp)
            if state is not None and state.has_valid_position:
                positions[tp] = state.position
        return positions

    def _in_order(
        self,
        tp: TopicPartition,
        records: list[ConsumerRecord[bytes, bytes]],
        expected: int | None,
        now: float,
    ) -> int:
        """How many of ``records`` to hand out; at a young gap, seek back to it and stop there."""
        for i, record in enumerate(records):
            if expected is not None and record.offset > expected:
                key = (tp, expected)
                first_seen = self._gaps.setdefault(key, now)
                lossy = tp.topic in self._lossy_topics
                if not lossy and now - first_seen < self._wait_s:
                    self._consumer.seek(tp, expected)  # drops what was fetched after the gap
                    return i
                del self._gaps[key]
                OFFSET_GAPS.labels(tp.topic, "skipped").inc(record.offset - expected)
                (log.debug if lossy else log.warning)(
                    "offsets not there, stepped over",
                    extra={
                        "topic": tp.topic,
                        "partition": tp.partition,
                        "offsets": [expected, record.offset - 1],
                    },
                )
            elif expected is not None and self._gaps.pop((tp, expected), None) is not None:
                OFFSET_GAPS.labels(tp.topic, "filled").inc()
            expected = record.offset + 1
        return len(records)

    def _forget_old(self, now: float) -> None:
        """Gaps of partitions this member no longer reads."""
        for key, first_seen in list(self._gaps.items()):
            if now - first_seen > self._wait_s * 10:
                del self._gaps[key]
