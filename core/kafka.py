"""aiokafka clients for Apache Kafka: producers, consumers, topics made and reconciled as declared.

Producers whose retries must not duplicate or reorder (the outbox relay, state events, dead
letters) are idempotent with ``acks=all``; the frames producer of a capture process is not (a
repeated frame is stored once, ``UNIQUE(stream_id, frame_seq)``, and a lost one is a live frame
gone). Fetch latency follows ``fetch_max_wait_ms``; frames need ``max_request_size`` above 1 MiB.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.errors import IllegalStateError, KafkaError, TopicAlreadyExistsError, for_code

from core.metrics import CONSUMER_LAG
from core.settings import Settings
from core.timeouts import within
from core.topics import TopicSpec, declared_topics, topic_spec

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
    settings: Settings,
    *,
    client_id: str = "lookout",
    request_timeout_ms: int = 15000,
    idempotent: bool = True,
) -> AIOKafkaProducer:
    """A producer for keyed, at-least-once publishing.

    ``idempotent`` (the default): acks from all in-sync replicas, and the broker drops a batch the
    producer re-sends after a lost acknowledgement, so a retry never writes twice or out of order.
    Otherwise the leader's ack is enough (live frames). ``request_timeout_ms`` also bounds how long
    a send waits while the broker is unreachable.
    """
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id=client_id,
        acks="all" if idempotent else 1,
        enable_idempotence=idempotent,
        max_request_size=settings.kafka_max_request_size,
        linger_ms=0,
        request_timeout_ms=request_timeout_ms,
    )


def consumer_group(settings: Settings, role: str) -> str:
    """The consumer group of a service role (``runner``, ``ml``, ``state-manager``)."""
    return f"{settings.kafka_group_prefix}-{role}"


def group_instance_id(settings: Settings, group_id: str) -> str | None:
    """The static member id of this instance in ``group_id`` (None: dynamic membership)."""
    instance = settings.kafka_instance_id
    if not instance:
        return None
    return f"{group_id}-{socket.gethostname() if instance == 'auto' else instance}"


def create_consumer(
    settings: Settings,
    *topics: str,
    group_id: str,
    client_id: str = "lookout",
    max_records_bytes: int | None = None,
    assignors: tuple[type[AbstractPartitionAssignor], ...] = (RoundRobinPartitionAssignor,),
    static: bool = False,
) -> AIOKafkaConsumer:
    """A consumer-group member that starts from ``earliest`` and commits offsets explicitly.

    ``assignors``: pass ``(RangePartitionAssignor,)`` to a member subscribed to several topics keyed
    alike when one instance must own the same stream ids on all of them (co-partitioning).
    ``static``: a static member (``group_instance_id``) when the settings name an instance.
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
        group_instance_id=group_instance_id(settings, group_id) if static else None,
    )


def lookout_topics(settings: Settings) -> list[str]:
    """The names of every topic Lookout declares (core/topics.py)."""
    return [spec.name for spec in declared_topics(settings)]


async def ensure_topics(
    settings: Settings,
    topics: list[str] | None = None,
    partitions: int | None = None,
    *,
    reconcile: bool = True,
) -> list[str]:
    """Create the ``topics`` (default: every declared one) that are missing, with their declared
    configuration, and with ``reconcile`` set those that exist right: configuration that drifted is
    set back, and missing partitions are added (Kafka cannot take partitions away: fewer wanted is
    logged). A service starting only makes what is missing (``reconcile=False``): more partitions
    move keys to other partitions under running consumers, an operator's step (``stack up``,
    ``lookout kafka topics``). ``partitions`` overrides the declared count (tests). Returns what was
    done, one line each."""
    specs = [topic_spec(settings, name, partitions) for name in (topics or lookout_topics(settings))]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="lookout-admin")
    await admin.start()
    try:
        return await _reconcile(admin, specs, reconcile=reconcile)
    finally:
        await admin.close()


async def _reconcile(admin: AIOKafkaAdminClient, specs: list[TopicSpec], *, reconcile: bool) -> list[str]:
    done: list[str] = []
    existing = {
        t["topic"]: len(t["partitions"])
        for t in await admin.describe_topics([s.name for s in specs])
        if t["error_code"] == 0
    }
    missing = [spec for spec in specs if spec.name not in existing]
    if missing:
        response = await admin.create_topics(
            [NewTopic(s.name, s.partitions, s.replication_factor, topic_configs=s.config) for s in missing]
        )
        for name, code, message in _topic_errors(response):
            if code and not isinstance(for_code(code)(), TopicAlreadyExistsError):
                raise for_code(code)(f"topic {name} not created: {message}")
        done += [f"created {s.name} ({s.partitions} partitions)" for s in missing]
    present = [spec for spec in specs if spec.name in existing]
    if not present or not reconcile:
        return done
    grow = {s.name: NewPartitions(s.partitions) for s in present if existing[s.name] < s.partitions}
    if grow:
        await admin.create_partitions(grow)
        done += [f"{name}: partitions {existing[name]} -> {new.total_count}" for name, new in grow.items()]
    for spec in present:
        if existing[spec.name] > spec.partitions:
            log.warning(
                "topic has more partitions than declared; Kafka cannot remove partitions",
                extra={"topic": spec.name, "partitions": existing[spec.name], "declared": spec.partitions},
            )
    current = await _topic_configs(admin, [s.name for s in present])
    drifted = [s for s in present if any(current.get(s.name, {}).get(k) != v for k, v in s.config.items())]
    if drifted:
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, s.name, configs=s.config) for s in drifted]
        )
        done += [f"reconfigured {s.name}" for s in drifted]
    return done


def _topic_errors(response: Any) -> list[tuple[str, int, str | None]]:
    """(topic, error code, message) of a CreateTopics response, whichever version answered."""
    return [(error[0], error[1], error[2] if len(error) > 2 else None) for error in response.topic_errors]


async def _topic_configs(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, dict[str, str]]:
    """The current configuration of each topic (its effective values, defaults included)."""
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
    configs: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response.resources:
            _code, _message, _kind, name, entries = resource[:5]
            configs[name] = {entry[0]: entry[1] for entry in entries}
    return configs


class ConsumerLagReporter:
    """Keeps ``lookout_consumer_lag`` of one consumer up to date, per topic, over its own partitions.

    The lag of a partition is ``highwater - position``: the records not yet handed to the service.
    aiokafka learns the highwater from every fetch response, so no extra request is made (no
    ``end_offsets`` round trip per pass). A partition not fetched yet is left out.
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
