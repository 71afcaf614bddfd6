"""aiokafka producer and consumer factories tuned for the embedded (Tansu) broker and real Kafka.

DESIGN.md: consumer-group joins wait ``session_timeout_ms / 2`` on Tansu, fetch latency follows
``fetch_max_wait_ms``, large frames need ``max_request_size`` above 1 MiB, and idempotent or
transactional producers fail, so none of them is used here.
"""

from __future__ import annotations

import contextlib
import logging
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.errors import IllegalStateError, KafkaError, TopicAlreadyExistsError

from core.metrics import CONSUMER_LAG
from core.settings import Settings
from core.timeouts import within

log = logging.getLogger(__name__)

POSITION_WAIT_S = 0.05  # a partition whose position is being reset is skipped, not waited for
CLOSE_TIMEOUT_S = 10.0


async def close_client(
    client: AIOKafkaProducer | AIOKafkaConsumer, what: str, timeout_s: float = CLOSE_TIMEOUT_S
) -> None:
    """Stop a producer or consumer, abandoning it after ``timeout_s``. A consumer's stop can freeze
    in its group's heartbeat (aiokafka #773), and a producer's flush on a broker that is gone: a
    service that is stopping must not hang on either. Never raises."""
    try:
        await within(client.stop(), timeout_s)
    except TimeoutError:
        log.warning(
            "kafka client did not stop in time, abandoned", extra={"client": what, "timeout_s": timeout_s}
        )
    except Exception as err:  # a client half started or broken: nothing more to free
        log.warning("kafka client stop failed", extra={"client": what, "error": repr(err)})


def create_producer(
    settings: Settings, *, client_id: str = "lookout", request_timeout_ms: int = 15000
) -> AIOKafkaProducer:
    """A producer for keyed, at-least-once publishing (acks from all in-sync replicas).

    ``request_timeout_ms`` also bounds how long a send waits while the broker is unreachable.
    """
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id=client_id,
        acks="all",
        enable_idempotence=False,
        max_request_size=settings.kafka_max_request_size,
        linger_ms=0,
        request_timeout_ms=request_timeout_ms,
    )


def consumer_group(settings: Settings, role: str) -> str:
    """The consumer group of a service role (``runner``, ``ml``, ``state-manager``)."""
    return f"{settings.kafka_group_prefix}-{role}"


def create_consumer(
    settings: Settings,
    *topics: str,
    group_id: str,
    client_id: str = "lookout",
    max_records_bytes: int | None = None,
    assignors: tuple[type[AbstractPartitionAssignor], ...] = (RoundRobinPartitionAssignor,),
) -> AIOKafkaConsumer:
    """A consumer-group member that starts from ``earliest`` and commits offsets explicitly.

    ``assignors``: pass ``(RangePartitionAssignor,)`` to a member subscribed to several topics keyed
    alike when one instance must own the same stream ids on all of them (co-partitioning).
    """
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=settings.kafka_bootstrap,
        client_id=client_id,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_ms,
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        max_partition_fetch_bytes=max_records_bytes or settings.kafka_max_request_size,
        fetch_max_bytes=max(max_records_bytes or 0, settings.kafka_max_request_size) * 2,
        partition_assignment_strategy=assignors,
    )


def lookout_topics(settings: Settings) -> list[str]:
    return [
        settings.topic_commands,
        settings.topic_frames,
        settings.topic_states,
        settings.topic_dead_letter,
        settings.topic_events,
    ]


async def ensure_topics(settings: Settings, topics: list[str] | None = None, partitions: int = 3) -> None:
    """Create Lookout's topics when they are missing (keyed by stream id, so order holds per stream)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="lookout-admin")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [t for t in (topics or lookout_topics(settings)) if t not in existing]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [NewTopic(name=t, num_partitions=partitions, replication_factor=1) for t in wanted]
                )
    finally:
        await admin.close()


class ConsumerLagReporter:
    """Keeps ``lookout_consumer_lag`` of one consumer up to date, per topic, over its own partitions.

    The lag of a partition is ``highwater - position``: the records not yet handed to the service.
    aiokafka learns the highwater from every fetch response, so no extra request is made (DESIGN.md:
    the embedded broker has no ``end_offsets``). A partition not fetched yet is left out.
    """

    def __init__(self, consumer: AIOKafkaConsumer, group_id: str, *, interval_s: float = 1.0) -> None:
        self._consumer = consumer
        self._group_id = group_id
        self._interval_s = interval_s
        self._next_at = 0.0
        self._topics: set[str] = set()
        self.lag: dict[str, int] = {}  # the last values set, by topic

    async def update(self) -> None:
        """Recompute the gauge, at most once per interval; call it from the consuming loop."""
        now = time.monotonic()
        if now < self._next_at:
            return
        self._next_at = now + self._interval_s
        lag: dict[str, int] = {}
        for tp in self._consumer.assignment():
            try:
                highwater = self._consumer.highwater(tp)
                if highwater is None:
                    continue
                position = await within(self._consumer.position(tp), POSITION_WAIT_S)
            except (AssertionError, IllegalStateError, KafkaError, TimeoutError):
                continue  # revoked meanwhile, or its position is being reset
            lag[tp.topic] = lag.get(tp.topic, 0) + max(0, highwater - position)
        for topic, records in lag.items():
            CONSUMER_LAG.labels(self._group_id, topic).set(records)
        for gone in self._topics - lag.keys():  # none of its partitions is this member's any more
            CONSUMER_LAG.remove(self._group_id, gone)
        self._topics = set(lag)
        self.lag = lag
