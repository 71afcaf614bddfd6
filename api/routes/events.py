"""Zone and line events: GET /events (filtered pages) and GET /events/stream (a live SSE feed).

Both read the ``events`` table, where each stream's detection process writes an event in the same
transaction as the frame that shows it. An event's ``id`` orders all events; the feed sends it as
the SSE ``id``, so a client that reconnects with ``Last-Event-ID`` misses nothing and sees nothing
twice.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated

import asyncpg
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from api.auth import AUTH_RESPONSES, ReadKey
from api.deps import DbDep, SettingsDep
from api.routes.detections import S3Dep, parse_cursor
from core.analytics import AnalyticsKind, Direction, EventCause
from core.storage import presigned_get

router = APIRouter(tags=["events"], responses=AUTH_RESPONSES)

FEED_POLL_S = 0.5
FEED_KEEPALIVE_S = 15.0
FEED_BATCH = 200

SELECT = """
SELECT id, event_id, stream_id, frame_seq, kind, zone, direction, track_id, class_name, confidence,
       dwell_s, occurred_at, s3_key, cause
  FROM events
 WHERE ($1::uuid IS NULL OR stream_id = $1)
   AND ($2::text IS NULL OR kind = $2)
   AND ($3::text IS NULL OR zone = $3)
   AND ($4::timestamptz IS NULL OR occurred_at >= $4)
"""
PAGE = SELECT + " AND ($5::bigint IS NULL OR id < $5) ORDER BY id DESC LIMIT $6"
AFTER = SELECT + " AND id > $5 ORDER BY id LIMIT $6"


class EventView(BaseModel):
    """One event, with a fresh link to the annotated frame that shows it."""

    id: int = Field(description="Orders all events; the SSE id and the cursor")
    event_id: str
    stream_id: uuid.UUID
    kind: AnalyticsKind
    zone: str = Field(description="The zone's or line's name")
    direction: Direction | None
    track_id: int
    class_name: str
    confidence: float
    dwell_s: float | None
    cause: EventCause | None = Field(
        default=None, description="'restart': a visit closed because the detection process restarted"
    )
    frame_seq: int
    occurred_at: datetime
    image_url: str


class EventPage(BaseModel):
    items: list[EventView] = Field(description="Newest first")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next, older page")
    links_expire_in_s: int


def _view(row: asyncpg.Record, image_url: str) -> EventView:
    return EventView(**{k: row[k] for k in EventView.model_fields if k != "image_url"}, image_url=image_url)


Filters = tuple[uuid.UUID | None, str | None, str | None, datetime | None]
StreamFilter = Annotated[uuid.UUID | None, Query(alias="id", description="Only this stream's events")]
ZoneFilter = Annotated[str | None, Query(max_length=64, description="Only this zone's or line's")]


@router.get("/events")
async def events(
    db: DbDep,
    settings: SettingsDep,
    s3: S3Dep,
    _key: ReadKey,
    stream_id: StreamFilter = None,
    kind: AnalyticsKind | None = None,
    zone: ZoneFilter = None,
    since: Annotated[datetime | None, Query(description="Only events at or after this time")] = None,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> EventPage:
    """Events newest first, filtered by stream, kind, zone or line, and time."""
    before = parse_cursor(cursor)
    filters: Filters = (stream_id, kind.value if kind else None, zone, since)
    rows = await db.fetch(PAGE, *filters, before, limit + 1)
    page, more = rows[:limit], len(rows) > limit
    expiry = settings.s3_presign_expiry_s
    return EventPage(
        items=[_view(r, presigned_get(s3, settings.s3_bucket_frames, r["s3_key"], expiry)) for r in page],
        next_cursor=str(page[-1]["id"]) if more else None,
        links_expire_in_s=expiry,
    )


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
    kind: AnalyticsKind | None = None,
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
    filters: Filters = (stream_id, kind.value if kind else None, zone, None)

    async def feed() -> AsyncIterator[str]:
        last, quiet_s = resume, 0.0
        yield "retry: 2000\n\n"
        while not await request.is_disconnected():
            rows = await db.fetch(AFTER, *filters, last, FEED_BATCH)
            for row in rows:
                view = _view(
                    row,
                    presigned_get(s3, settings.s3_bucket_frames, row["s3_key"], settings.s3_presign_expiry_s),
                )
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
