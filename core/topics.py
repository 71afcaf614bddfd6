"""Lookout's Kafka topics, declared in one place with the configuration a Kafka operator would set.

``stack up`` (and every service as it starts) creates what is missing and reconciles what drifted
(``core.kafka.ensure_topics``). Every topic is keyed by stream id. The commands and frames topics
have the same partition count: ML's range assignor gives one member the same partitions of both,
so the instance that runs a stream's detection also receives its stop.

Retention is by time and by bytes. ``retention.bytes`` is per partition in Kafka and counts closed
segments only, so the byte settings here are what a whole topic may hold on disk: each partition
gets an equal share, of which one segment is the active one and one is headroom for what arrives
between two retention checks; ``retention.bytes`` is the rest. Deleted segments go at once
(``file.delete.delay.ms``), so what is on disk is what the bound says.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.settings import Settings

DAY_S = 86_400
SEGMENTS_PER_PARTITION = 8  # a partition's share is cut in this many segments
MIN_SEGMENT_BYTES = 1024 * 1024  # Kafka refuses smaller segments
JSON_COMPRESSION = "zstd"  # small JSON events compress well; the broker does it on write


@dataclass(frozen=True)
class TopicSpec:
    """One topic: its name, partitions, replication and topic-level configuration."""

    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str] = field(default_factory=dict)


def bounded_topic_config(
    *, disk_bytes: int, partitions: int, retention_s: float, compression: str, settings: Settings
) -> dict[str, str]:
    """Topic configuration that keeps the topic within ``disk_bytes`` on disk and ``retention_s`` old."""
    share = disk_bytes // partitions
    segment = max(MIN_SEGMENT_BYTES, share // SEGMENTS_PER_PARTITION)
    retention_ms = int(retention_s * 1000)
    return {
        "cleanup.policy": "delete",
        "retention.ms": str(retention_ms),
        "retention.bytes": str(max(segment, share - 2 * segment)),
        "segment.bytes": str(segment),
        # a segment closes at the latest after a fifth of the retention (time retention deletes
        # closed segments only), and at most daily
        "segment.ms": str(max(10_000, min(retention_ms // 5, DAY_S * 1000))),
        "file.delete.delay.ms": "1000",
        "max.message.bytes": str(settings.kafka_max_request_size),
        "min.insync.replicas": str(settings.kafka_min_insync_replicas),
        "compression.type": compression,
    }


def declared_topics(settings: Settings) -> list[TopicSpec]:
    """Every topic Lookout uses, with its configuration."""
    s = settings

    def topic(name: str, retention_s: float, disk_bytes: int, compression: str) -> TopicSpec:
        config = bounded_topic_config(
            disk_bytes=disk_bytes,
            partitions=s.kafka_partitions,
            retention_s=retention_s,
            compression=compression,
            settings=s,
        )
        return TopicSpec(name, s.kafka_partitions, s.kafka_replication_factor, config)

    return [
        # JPEGs do not compress: the producer's bytes are stored as they are
        topic(s.topic_frames, s.kafka_frames_retention_s, s.kafka_frames_retention_bytes, "producer"),
        topic(
            s.topic_commands, s.kafka_commands_retention_s, s.kafka_topic_retention_bytes, JSON_COMPRESSION
        ),
        topic(s.topic_states, s.kafka_states_retention_s, s.kafka_topic_retention_bytes, JSON_COMPRESSION),
        topic(s.topic_events, s.kafka_events_retention_s, s.kafka_topic_retention_bytes, JSON_COMPRESSION),
        # annotated JPEGs of watched streams: seconds, never read again
        topic(s.topic_live, s.kafka_live_retention_s, s.kafka_live_retention_bytes, "producer"),
        # dead letters may be frames: stored as they came
        topic(
            s.topic_dead_letter, s.kafka_dead_letter_retention_s, s.kafka_topic_retention_bytes, "producer"
        ),
    ]


def topic_spec(settings: Settings, name: str, partitions: int | None = None) -> TopicSpec:
    """The declared topic called ``name``; a name Lookout does not declare (a test's, a tool's) gets
    the configuration of the states topic. ``partitions`` overrides the declared count."""
    specs = declared_topics(settings)
    spec = next((t for t in specs if t.name == name), None)
    if spec is None:
        states = next(t for t in specs if t.name == settings.topic_states)
        spec = TopicSpec(name, states.partitions, states.replication_factor, dict(states.config))
    if partitions is not None and partitions != spec.partitions:
        spec = TopicSpec(spec.name, partitions, spec.replication_factor, spec.config)
    return spec
