"""``lookout-broker-retention``: keeps the embedded broker's partitions small enough to be read.

Tansu on S3 keeps one object per record batch and has no retention (its ``DeleteRecords`` is not
implemented). Every fetch lists all the objects of its partition and stops listing when the
fetch's wait (``kafka_fetch_max_wait_ms``, 50 ms) is over, so once a partition holds a few thousand
records a consumer at its end gets nothing at all (measured here: tail fetches answer in 23-39 ms
at 1,000 records and never at 3,000). One stream's frames reach that in ten minutes.

This worker deletes the batch objects that are no longer needed, as Kafka's retention would:
- frames once ML's group committed past them and they are older than
  ``broker_frames_retention_s`` (5 s), and any frame older than ``broker_frames_max_age_s`` (60 s),
  read or not: live video that old is never detected, and a partition of an ML that fell behind
  must stay listable (the ML consumer steps over what went);
- commands and state events only once every Lookout consumer group of their topic has committed
  past them, and older than ``broker_retention_s`` (nothing accepted is dropped unread);
- records of topics no Lookout group reads (zone events, dead letters) older than
  ``broker_unread_retention_s``.

A batch holds one or more records and ends where the next one starts, so it goes only once the
commit has reached the next batch. A consumer may still be reading a frame that is deleted under
it: Tansu answers that fetch with an error and the consumer fetches again.

It runs under ``lookout up`` only: a real Kafka (the compose file) has retention of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from core.kafka import consumer_group
from core.metrics import BROKER_BATCHES_TRIMMED
from core.retry import wait_any
from core.settings import Settings
from core.storage import create_s3_client
from workers.entrypoint import run_service

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredBatch:
    """One record batch object of the broker's log."""

    topic: str
    partition: int
    base_offset: int
    key: str
    stored_at: datetime


def parse_batch_key(key: str, stored_at: datetime) -> StoredBatch | None:
    """``clusters/C/topics/T/partitions/0000000002/records/00000000000000000042.batch`` as a batch."""
    parts = key.split("/")
    if len(parts) != 8 or parts[0::2] != ["clusters", "topics", "partitions", "records"]:
        return None
    partition, offset = parts[5], parts[7].removesuffix(".batch")
    if not partition.isdigit() or not parts[7].endswith(".batch") or not offset.isdigit():
        return None
    return StoredBatch(parts[3], int(partition), int(offset), key, stored_at)


class BrokerLogTrimmer:
    """Deletes the broker's record batches that retention lets go (see the module docstring)."""

    def __init__(self, settings: Settings, s3: Minio | None = None) -> None:
        self.settings = settings
        self._s3 = s3 or create_s3_client(settings)

    def readers(self) -> dict[str, list[str]]:
        """The Lookout consumer groups that must have read a topic's records before they go."""
        s = self.settings
        runner, ml, states = (consumer_group(s, r) for r in ("runner", "ml", "state-manager"))
        return {s.topic_commands: [runner, ml], s.topic_frames: [ml], s.topic_states: [states]}

    async def committed(self, partitions: set[TopicPartition]) -> dict[TopicPartition, int]:
        """Of ``partitions`` of the read topics, the lowest offset their groups committed; a
        partition some group never committed is left out (it keeps everything)."""
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.settings.kafka_bootstrap, client_id="lookout-retention"
        )
        await admin.start()
        try:
            lowest: dict[TopicPartition, int] = {}
            for topic, groups in self.readers().items():
                tps = [tp for tp in partitions if tp.topic == topic]
                if not tps:
                    continue
                # each partition asked for by name: Tansu's answer to "all of the group's" breaks aiokafka
                per_group = [await admin.list_consumer_group_offsets(g, partitions=tps) for g in groups]
                for tp in tps:
                    offsets = [o[tp].offset if tp in o else -1 for o in per_group]
                    if min(offsets) >= 0:
                        lowest[tp] = min(offsets)
            return lowest
        finally:
            await admin.close()

    def stored(self) -> list[StoredBatch]:
        """Every record batch object of the broker's log, with when it was stored."""
        listed = self._s3.list_objects(self.settings.broker_log_bucket, prefix="clusters/", recursive=True)
        batches = (
            parse_batch_key(item.object_name, item.last_modified)
            for item in listed
            if item.object_name and item.last_modified
        )
        return [batch for batch in batches if batch is not None]

    def expired(self, batches: list[StoredBatch], committed: dict[TopicPartition, int]) -> list[StoredBatch]:
        """The batches retention lets go, as of now."""
        s = self.settings
        now = datetime.now(UTC)
        read = self.readers()
        # a batch of a read topic ends where the next one starts: it may go once that is committed
        next_base: dict[StoredBatch, int] = {}
        by_partition: dict[TopicPartition, list[StoredBatch]] = defaultdict(list)
        for batch in batches:
            by_partition[TopicPartition(batch.topic, batch.partition)].append(batch)
        for in_partition in by_partition.values():
            in_partition.sort(key=lambda b: b.base_offset)
            for batch, after in pairwise(in_partition):
                next_base[batch] = after.base_offset
        gone = []
        for batch in batches:
            age = now - batch.stored_at

            def older(seconds: float, age: timedelta = age) -> bool:
                return age >= timedelta(seconds=seconds)

            if batch.topic not in read:
                expired = older(s.broker_unread_retention_s)
            else:
                safe = committed.get(TopicPartition(batch.topic, batch.partition), 0)
                read_by_all = batch in next_base and next_base[batch] <= safe
                frames = batch.topic == s.topic_frames
                window = s.broker_frames_retention_s if frames else s.broker_retention_s
                expired = (read_by_all and older(window)) or (frames and older(s.broker_frames_max_age_s))
            if expired:
                gone.append(batch)
        return gone

    async def trim_once(self) -> int:
        """One pass: deletes what retention lets go; returns how many batches were deleted."""
        batches = await asyncio.to_thread(self.stored)
        committed = await self.committed({TopicPartition(b.topic, b.partition) for b in batches})
        gone = self.expired(batches, committed)
        if gone:
            await asyncio.to_thread(self._delete, gone)
            by_topic = Counter(batch.topic for batch in gone)
            for topic, count in by_topic.items():
                BROKER_BATCHES_TRIMMED.labels(topic).inc(count)
            log.info(
                "broker log trimmed", extra={"batches": dict(by_topic), "kept": len(batches) - len(gone)}
            )
        return len(gone)

    def _delete(self, gone: list[StoredBatch]) -> None:
        errors = self._s3.remove_objects(self.settings.broker_log_bucket, (DeleteObject(b.key) for b in gone))
        for error in errors:  # the iterator performs the deletes
            log.warning("broker batch not deleted", extra={"key": error.name, "error": error.message})


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Trim every ``broker_trim_interval_s`` until stopped; a broker or S3 outage only skips a pass."""
    trimmer = BrokerLogTrimmer(settings)
    log.info("broker retention started", extra={"bucket": settings.broker_log_bucket})
    while not stop.is_set():
        try:
            await trimmer.trim_once()
        except (KafkaError, OSError, S3Error) as err:  # the next pass tries again
            log.warning("broker retention pass failed", extra={"error": repr(err)})
        await wait_any(stop, None, settings.broker_trim_interval_s)


def main() -> None:
    """Console script ``lookout-broker-retention``."""
    run_service("broker-retention", serve, metrics_port=lambda s: s.metrics_port_retention)
