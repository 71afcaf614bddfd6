"""Zone, line and health events: GET /events (filtered pages) and GET /events/stream (a live SSE feed).

Both read the ``events`` table, where each stream's detection process writes a zone or line event in
the same transaction as the frame that shows it, and the stream's lifecycle its health events
(``core/health_events.py``). An event's ``id`` orders all events; the feed sends it as
the SSE ``id``, so a client that reconnects with ``Last-Event-ID`` misses nothing and sees nothing
twice.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Header, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse
from minio import Minio
from pydantic import BaseModel, Field

from api.auth import AUTH_RESPONSES, AdminKey, ReadKey
from api.deps import DbDep, SettingsDep
from api.routes.detections import S3Dep, parse_cursor
from core.analytics import AnalyticsKind, Direction, EventCause
from core.health_events import HealthKind, downtime_s
from core.messages import Service
from core.retention import PINS_LOCK
from core.settings import Settings
from core.storage import presigned_get

router = APIRouter(tags=["events"], responses=AUTH_RESPONSES)

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No event has this id"}}

FEED_POLL_S = 0.5
FEED_KEEPALIVE_S = 15.0
FEED_BATCH = 200

COLUMNS = """id, event_id, stream_id, frame_seq, kind, zone, direction, track_id, class_name, confidence, dwell_s, occurred_at, s3_key, cause, pinned_at, frame_deleted_at, since, service, reason, final"""
SELECT = f"""
SELECT {COLUMNS}
  FROM events
 WHERE ($1::uuid IS NULL OR stream_id = $1)
   AND ($2::text IS NULL OR kind = $2)
   AND ($3::text IS NULL OR zone = $3)
   AND ($4::timestamptz IS NULL OR occurred_at >= $4)
   AND ($5::bool IS NULL OR (pinned_at IS NOT NULL) = $5)
"""
PAGE = SELECT + " AND ($6::bigint IS NULL OR id < $6) ORDER BY id DESC LIMIT $7"
AFTER = SELECT + " AND id > $6 ORDER BY id LIMIT $7"


class EventKindName(StrEnum):
    """Every kind of event: a zone's or line's (AnalyticsKind), or a stream's health (HealthKind)."""

    ENTERED = "entered"
    LEFT = "left"
    DWELL = "dwell"
    CROSSED = "crossed"
    CAMERA_OFFLINE = "camera_offline"
    CAMERA_ONLINE = "camera_online"
    SERVICE_RESTARTED = "service_restarted"
    STREAM_FAILED = "stream_failed"
    STREAM_RECOVERED = "stream_recovered"


class EventView(BaseModel):
    """One event: a zone or line event, with a fresh link to the annotated frame that shows it, or a
    health event of the stream (no frame, no object: ``service``, ``reason``, ``since``, ``final``)."""

    id: int = Field(description="Orders all events; the SSE id and the cursor")
    event_id: str
    stream_id: uuid.UUID
    kind: AnalyticsKind | HealthKind
    zone: str | None = Field(description="The zone's or line's name (zone and line events)")
    direction: Direction | None
    track_id: int | None
    class_name: str | None
    confidence: float | None
    dwell_s: float | None
    cause: EventCause | None = Field(
        default=None, description="'restart': a visit closed because the detection process restarted"
    )
    frame_seq: int | None
    occurred_at: datetime
    since: datetime | None = Field(default=None, description="Health: when the episode began")
    downtime_s: float | None = Field(default=None, description="camera_online, stream_recovered: how long")
    service: Service | None = Field(default=None, description="service_restarted: which service")
    reason: str | None = Field(default=None, description="Health: why (the error, the silence)")
    final: bool | None = Field(default=None, description="stream_failed: the stream has ended")
    pinned_at: datetime | None = Field(
        default=None, description="Pinned (POST /events/{id}/pin): no retention deletes it or its frame"
    )
    frame_deleted_at: datetime | None = Field(
        default=None, description="When retention deleted the frame that showed it (the event was kept)"
    )
    image_url: str | None = Field(
        description="Presigned link to the annotated frame; null once the frame was deleted (frame_deleted_at)"
    )


class EventPage(BaseModel):
    items: list[EventView] = Field(description="Newest first")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next, older page")
    links_expire_in_s: int


def _view(row: asyncpg.Record, settings: Settings, s3: Minio) -> EventView:
    image_url = None
    if row["frame_deleted_at"] is None and row["s3_key"] is not None:
        image_url = presigned_get(s3, settings.s3_bucket_frames, row["s3_key"], settings.s3_presign_expiry_s)
    downtime = downtime_s(row["kind"], row["since"], row["occurred_at"])
    computed = ("image_url", "downtime_s")
    stored = {k: row[k] for k in EventView.model_fields if k not in computed}
    return EventView(**stored, image_url=image_url, downtime_s=downtime)


Filters = tuple[uuid.UUID | None, str | None, str | None, datetime | None, bool | None]
StreamFilter = Annotated[uuid.UUID | None, Query(alias="id", description="Only this stream's events")]
ZoneFilter = Annotated[str | None, Query(max_length=64, description="Only this zone's or line's")]


@router.get("/events")
async def events(
    db: DbDep,
    settings: SettingsDep,
    s3: S3Dep,
    _key: ReadKey,
    stream_id: StreamFilter = None,
    kind: EventKindName | None = None,
    zone: ZoneFilter = None,
    since: Annotated[datetime | None, Query(description="Only events at or after this time")] = None,
    pinned: Annotated[bool | None, Query(description="Only pinned (true) or unpinned (false) events")] = None,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> EventPage:
    """Events newest first (zone, line and health), filtered by stream, kind, zone or line, and time."""
    before = parse_cursor(cursor)
    filters: Filters = (stream_id, kind.value if kind else None, zone, since, pinned)
    rows = await db.fetch(PAGE, *filters, before, limit + 1)
    page, more = rows[:limit], len(rows) > limit
    return EventPage(
        items=[_view(r, settings, s3) for r in page],
        next_cursor=str(page[-1]["id"]) if more else None,
        links_expire_in_s=settings.s3_presign_expiry_s,
    )


@router.post("/events/{event_pk}/pin", responses=NOT_FOUND)
async def pin_event(
    db: DbDep, settings: SettingsDep, s3: S3Dep, _admin: AdminKey, event_pk: int
) -> EventView:
    """Pin an event: no retention deletes it or the frame that shows it (deleting its stream does)."""
    return await _set_pin(db, settings, s3, event_pk, pinned=True)


@router.delete("/events/{event_pk}/pin", responses=NOT_FOUND)
async def unpin_event(
    db: DbDep, settings: SettingsDep, s3: S3Dep, _admin: AdminKey, event_pk: int
) -> EventView:
    """Unpin an event: its retention applies again."""
    return await _set_pin(db, settings, s3, event_pk, pinned=False)


async def _set_pin(
    db: asyncpg.Pool, settings: Settings, s3: Minio, event_pk: int, *, pinned: bool
) -> EventView:
    if not 0 < event_pk < 2**63:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"event {event_pk} not found")
    async with db.acquire() as conn, conn.transaction():
        # shared with the janitor's deleting transactions: the batch in flight ends first
        await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", PINS_LOCK)
        row = await conn.fetchrow(
            "UPDATE events SET pinned_at = CASE WHEN $2 THEN coalesce(pinned_at, now()) END WHERE id = $1"
            f" RETURNING {COLUMNS}",
            event_pk,
            pinned,
        )
    if row is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"event {event_pk} not found (never stored, or deleted by retention)",
        )
    return _view(row, settings, s3)


@router.get(
    "/events/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}},
)
async def event_feed(
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    s3: S3Dep,
    _key: ReadKey,
    stream_id: StreamFilter = None,
    kind: EventKindName | None = None,
    zone: ZoneFilter = None,
    last_event_id: Annotated[
        str | None, Header(description="Resume after this event (sent by EventSource on reconnect)")
    ] = None,
    after: Annotated[
        str | None, Query(description="Resume after this event id (instead of the header)")
    ] = None,
) -> StreamingResponse:
    """Live events as Server-Sent Events (``event:`` the kind, ``data:`` the event as JSON). Without
    ``Last-Event-ID`` (or ``after``) the feed starts with the events from now on."""
    resume = parse_cursor(last_event_id if last_event_id is not None else after, name="last-event-id")
    if resume is None:
        resume = await db.fetchval("SELECT coalesce(max(id), 0) FROM events")
    filters: Filters = (stream_id, kind.value if kind else None, zone, None, None)

    async def feed() -> AsyncIterator[str]:
        last, quiet_s = resume, 0.0
        yield "retry: 2000\n\n"
        while not await request.is_disconnected():
            rows = await db.fetch(AFTER, *filters, last, FEED_BATCH)
            for row in rows:
                view = _view(row, settings, s3)
                yield f"id: {row['id']}\nevent: {row['kind']}\ndata: {view.model_dump_json()}\n\n"
                last = row["id"]
            if rows:
                quiet_s = 0.0
                continue
            await asyncio.sleep(FEED_POLL_S)
            quiet_s += FEED_POLL_S
            if quiet_s >= FEED_KEEPALIVE_S:
                quiet_s = 0.0
                yield ": keep-alive\n\n"

    return StreamingResponse(
        feed(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
