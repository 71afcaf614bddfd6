"""Health events: what happened to a stream's camera and services, pushed like zone events.

The stream's lifecycle (its watchdog, ``workflows/supervision.py``) decides them; an activity stores
each one in ``events`` in one transaction with its outbox message (the events topic), its webhook
delivery and its MQTT delivery (``store_health_event``). An event's id is derived from the stream and
the moment its episode began, so a retried activity or a replayed workflow stores nothing twice.

- ``camera_offline``: the camera stopped giving frames and has not come back within the debounce
  (``health_debounce_s``); ``since`` is when it stopped.
- ``camera_online``: it is back; ``since`` is when it went down, ``downtime_s`` how long it was.
- ``service_restarted``: the watchdog restarted a service for the stream (``service``, ``reason``),
  or the service's process for the stream started over on its own (its counts began again).
- ``stream_failed``: the stream has made no detections for the debounce because a service lost it
  (``final`` false: it is being restarted), or it ended in ``inactive_error`` (``final`` true).
- ``stream_recovered``: after a ``stream_failed`` that was not final, every service runs it again.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg
from pydantic import BaseModel, Field

from core.analytics import AnalyticsEvent
from core.messages import Service
from core.outbox import OutboxMessage, enqueue, events_topic_message
from core.settings import Settings


class HealthKind(StrEnum):
    CAMERA_OFFLINE = "camera_offline"
    CAMERA_ONLINE = "camera_online"
    SERVICE_RESTARTED = "service_restarted"
    STREAM_FAILED = "stream_failed"
    STREAM_RECOVERED = "stream_recovered"


class HealthEvent(BaseModel):
    """One health event of a stream: stored in ``events``, published on the events topic, pushed to
    webhooks and MQTT."""

    event_id: str = Field(description="Unique and stable: the same episode always gives the same id")
    stream_id: str
    kind: HealthKind
    occurred_at: datetime
    since: datetime | None = Field(
        default=None, description="When the episode began (camera down, stream failing)"
    )
    downtime_s: float | None = Field(default=None, description="camera_online, stream_recovered: how long")
    service: Service | None = Field(default=None, description="service_restarted: which one")
    reason: str | None = Field(default=None, description="Why: the error, the silence, the restart")
    final: bool | None = Field(default=None, description="stream_failed: the stream has ended")


def health_event_id(stream_id: str, kind: HealthKind, at: datetime, detail: str = "") -> str:
    """The id of ``kind`` for the episode that began (or the act done) ``at``."""
    suffix = f":{detail}" if detail else ""
    return f"{stream_id}:health:{kind.value}:{at.isoformat()}{suffix}"


# the columns of ``events`` that make either kind of event (webhooks and MQTT read them)
EVENT_COLUMNS = (
    "event_id, stream_id, kind, zone, direction, track_id, class_name, confidence, frame_seq, occurred_at,"
    " s3_key, dwell_s, cause, since, service, reason, final"
)
HEALTH_KINDS = frozenset(HealthKind)


def downtime_s(kind: str, since: datetime | None, at: datetime) -> float | None:
    """How long the episode an event ends lasted (``camera_online``, ``stream_recovered``), else None."""
    ends = kind in (HealthKind.CAMERA_ONLINE, HealthKind.STREAM_RECOVERED)
    return (at - since).total_seconds() if ends and since is not None else None


def stored_event(row: Mapping[str, Any]) -> AnalyticsEvent | HealthEvent:
    """The event a row of ``events`` (its ``EVENT_COLUMNS``) holds: a zone or line event, or a health one."""
    fields = dict(row.items())
    fields["stream_id"] = str(fields["stream_id"])
    if fields["kind"] in HEALTH_KINDS:
        fields["downtime_s"] = downtime_s(fields["kind"], fields.get("since"), fields["occurred_at"])
        return HealthEvent.model_validate({k: v for k, v in fields.items() if k in HealthEvent.model_fields})
    return AnalyticsEvent.model_validate(
        {k: v for k, v in fields.items() if k in AnalyticsEvent.model_fields}
    )


def health_message(settings: Settings, event: HealthEvent) -> OutboxMessage:
    """A health event on the events topic (beside the zone events)."""
    return events_topic_message(settings, event, "health")


INSERT = """
INSERT INTO events (event_id, stream_id, kind, occurred_at, since, service, reason, final)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (event_id) DO NOTHING
RETURNING id
"""
# a delivery when the stream has a webhook_url now (its row decides)
INSERT_WEBHOOK = """
INSERT INTO webhook_deliveries (event_pk, stream_id)
SELECT $1, id FROM streams WHERE id = $2 AND options->>'webhook_url' IS NOT NULL
ON CONFLICT DO NOTHING
"""
INSERT_MQTT = "INSERT INTO mqtt_deliveries (event_pk) VALUES ($1) ON CONFLICT DO NOTHING"


async def store_health_event(pool: asyncpg.Pool, settings: Settings, event: HealthEvent) -> bool:
    """Store ``event`` with its outbox message and deliveries in one transaction; False when it was
    stored already (or its stream is gone)."""
    async with pool.acquire() as conn, conn.transaction():
        exists = await conn.fetchval("SELECT 1 FROM streams WHERE id = $1::uuid", event.stream_id)
        if not exists:
            return False
        pk = await conn.fetchval(
            INSERT,
            event.event_id,
            event.stream_id,
            event.kind.value,
            event.occurred_at,
            event.since,
            event.service.value if event.service else None,
            event.reason,
            event.final,
        )
        if pk is None:
            return False
        await enqueue(conn, [health_message(settings, event)])
        await conn.execute(INSERT_WEBHOOK, pk, event.stream_id)
        if settings.mqtt_enabled:
            await conn.execute(INSERT_MQTT, pk)
    return True
