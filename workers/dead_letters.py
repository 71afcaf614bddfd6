"""The dead-letter topic: where a service puts a record it cannot use, with why and where it was.

Every consumer of Lookout (the runner, ML, the state bridge) logs and counts a malformed record,
copies it here and goes on: one bad record never stops a partition or crash-loops a service. The
copy is published before the record's offset is committed, so a bad record is kept, never lost.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer, ConsumerRecord

from core.metrics import DEAD_LETTERED
from core.retry import retrying
from core.settings import Settings


def dead_letter_headers(
    record: ConsumerRecord[bytes, bytes], reason: str, group: str
) -> list[tuple[str, bytes]]:
    return [
        ("error", reason[:500].encode()),
        ("source_topic", record.topic.encode()),
        ("source_partition", str(record.partition).encode()),
        ("source_offset", str(record.offset).encode()),
        ("consumer_group", group.encode()),
    ]


async def dead_letter(
    producer: AIOKafkaProducer,
    settings: Settings,
    record: ConsumerRecord[bytes, bytes],
    reason: str,
    *,
    group: str,
    service: str,
    stop: asyncio.Event | None = None,
    max_s: float | None = None,
) -> None:
    """Copy ``record`` to the dead-letter topic, retried (waits up to ``max_s``) until it is there
    or ``stop`` is set."""
    async for attempt in retrying(
        settings,
        "dead-letter publish",
        stop_event=stop,
        context={"offset": record.offset},
        max_s=settings.retry_max_s if max_s is None else max_s,
    ):
        with attempt:
            await producer.send_and_wait(
                settings.topic_dead_letter,
                record.value or b"",
                key=record.key,
                headers=dead_letter_headers(record, reason, group),
            )
    DEAD_LETTERED.labels(service, record.topic).inc()
