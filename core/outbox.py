"""The transactional outbox: how a Kafka message is queued in Postgres, to be published by the relay.

A message is inserted in the same transaction as the state change that causes it, so either both
happen or neither; ``workers/outbox_relay.py`` publishes the rows keyed by stream id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import asyncpg

from core.analytics import AnalyticsEvent
from core.messages import StartCommand, StateEvent, StopCommand
from core.settings import Settings

NOTIFY_CHANNEL = "lookout_outbox"  # the migration's trigger notifies it on every insert


@dataclass(frozen=True)
class OutboxMessage:
    """One row of the outbox: where it goes, its key, its bytes and the key that makes it unique."""

    topic: str
    key: str
    payload: bytes
    dedupe_key: str


def command_dedupe_key(command_id: str) -> str:
    """The dedupe key of a command: a retried insert of the same command is a no-op."""
    return f"command:{command_id}"


class StreamEvent(Protocol):
    """What goes on the events topic: a zone, line or health event of a stream."""

    event_id: str
    stream_id: str

    def model_dump_json(self) -> str: ...


def events_topic_message(settings: Settings, event: StreamEvent, family: str) -> OutboxMessage:
    """``event`` on the events topic, keyed by stream; ``family`` keeps the dedupe keys apart."""
    return OutboxMessage(
        topic=settings.topic_events,
        key=event.stream_id,
        payload=event.model_dump_json().encode(),
        dedupe_key=f"{family}:{event.event_id}",
    )


def analytics_message(settings: Settings, event: AnalyticsEvent) -> OutboxMessage:
    """A zone or line event on the events topic."""
    return events_topic_message(settings, event, "analytics")


def event_dedupe_key(event_id: str) -> str:
    """The dedupe key of a state event."""
    return f"event:{event_id}"


def command_message(settings: Settings, command: StartCommand | StopCommand) -> OutboxMessage:
    """A command for the runner and ML on the commands topic."""
    return OutboxMessage(
        topic=settings.topic_commands,
        key=command.stream_id,
        payload=command.model_dump_json().encode(),
        dedupe_key=command_dedupe_key(command.command_id),
    )


def event_message(settings: Settings, event: StateEvent) -> OutboxMessage:
    """A state event for the state-manager on the states topic."""
    return OutboxMessage(
        topic=settings.topic_states,
        key=event.stream_id,
        payload=event.model_dump_json().encode(),
        dedupe_key=event_dedupe_key(event.event_id),
    )


INSERT_ONE = """
INSERT INTO outbox (topic, key, payload, dedupe_key) VALUES (%s, %s, %s, %s)
ON CONFLICT (dedupe_key) DO NOTHING
"""  # psycopg's placeholders: the detection process's store, in its own transaction


async def enqueue(conn: asyncpg.Connection, messages: list[OutboxMessage]) -> int:
    """Insert ``messages`` in order (call it inside the caller's transaction); returns how many were new."""
    inserted = await conn.fetch(
        """
        INSERT INTO outbox (topic, key, payload, dedupe_key)
        SELECT m.topic, m.key, m.payload, m.dedupe_key
          FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[]) WITH ORDINALITY
               AS m(topic, key, payload, dedupe_key, n)
         ORDER BY m.n
        ON CONFLICT (dedupe_key) DO NOTHING
        RETURNING id
        """,
        [m.topic for m in messages],
        [m.key for m in messages],
        [m.payload for m in messages],
        [m.dedupe_key for m in messages],
    )
    return len(inserted)
