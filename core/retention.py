"""What a stream keeps, and for how long: its store policy and its retention (contracts of the API,
the detection processes and the storage janitor).

A stream's ``store`` option says which processed frames become an annotated JPEG in S3 and a row:
``all`` of them, those with ``objects`` (the default), those where something ``changes`` (the set of
tracked objects or the zones they stand in, or at least every ``store_every_s`` while objects
stay), or only those that carry an ``events``. A frame not stored is counted, never silently lost.
Its ``retention`` says how long frames and events are kept and how many bytes its frames may take;
the storage janitor (workers/janitor.py) also keeps every stream's frames together within a global
budget, oldest first, and never deletes a pinned event's frame.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.metrics import (
    STORAGE_BUDGET_BYTES,
    STORAGE_DAYS_UNTIL_FULL,
    STORAGE_STREAM_BYTES,
    STORAGE_TOTAL_BYTES,
)

# pg advisory lock: the janitor holds it (exclusively) in every transaction that deletes frames, a pin
# shares it, so a pin waits for the batch in flight and every later batch sees it
PINS_LOCK = 0x6C6F6F70


class StorePolicy(StrEnum):
    """Which processed frames are stored."""

    ALL = "all"
    OBJECTS = "objects"
    CHANGES = "changes"
    EVENTS = "events"


class Retention(BaseModel):
    """How long a stream's frames and events are kept, and the bytes its frames may take (unset: the
    settings' defaults)."""

    model_config = ConfigDict(extra="forbid")

    frames_days: float | None = Field(
        default=None, gt=0, le=3650, description="Frames (and rows) kept this long"
    )
    events_days: float | None = Field(
        default=None, gt=0, le=3650, description="Events kept this long (their frame may go sooner)"
    )
    max_bytes: int | None = Field(
        default=None,
        ge=1024 * 1024,
        description="The stream's frames take at most this much; oldest go first",
    )


class StreamStorage(BaseModel):
    """What one stream's frames take now, and what retention did to them."""

    stream_id: uuid.UUID
    bytes: int = Field(description="Annotated frames kept now, in bytes")
    frames: int = Field(description="Frames (objects and their rows) kept now")
    oldest_frame_at: datetime | None = Field(description="Capture time of the oldest frame kept")
    oldest_frame_age_s: float | None
    deleted_frames: int = Field(description="Frames deleted by retention, the budget or a stream deletion")
    deleted_bytes: int
    deleted_events: int
    last_deletion_reason: str | None = Field(description="age, stream_bytes, budget or stream_deleted")


class StorageView(BaseModel):
    """The whole store: its size against the budget, and when the budget will be reached."""

    bytes: int = Field(description="Every stream's annotated frames, in bytes")
    frames: int
    budget_bytes: int
    used_fraction: float
    pending_deletions: int = Field(description="Objects whose rows are gone, still to delete from S3")
    stored_bytes_per_day: float | None = Field(
        description="The recent rate frames are stored at (over up to the last hour of samples)"
    )
    days_until_full: float | None = Field(
        description="When the budget is reached at that rate (0: reached, the oldest frames go as new "
        "ones come); null: nothing stored lately"
    )
    streams: list[StreamStorage]


STREAMS_STORAGE = """
SELECT st.stream_id, st.bytes, st.frames, st.deleted_frames, st.deleted_bytes, st.deleted_events,
       st.last_deletion_reason,
       (SELECT min(d.capture_time) FROM detections d WHERE d.stream_id = st.stream_id) AS oldest
  FROM stream_storage st
 WHERE $1::uuid[] IS NULL OR st.stream_id = ANY($1::uuid[])
 ORDER BY st.stream_id
"""
# the stored total now and about an hour ago: the rate
RATE = """
SELECT (SELECT coalesce(sum(stored_bytes), 0)::bigint FROM stream_storage) AS stored_now,
       s.stored_bytes AS stored_then, extract(epoch FROM now() - s.at) AS span_s
  FROM (SELECT at, stored_bytes FROM storage_samples WHERE at >= now() - interval '1 hour'
         ORDER BY at LIMIT 1) s
"""


async def streams_storage(conn: Any, stream_ids: list[uuid.UUID] | None) -> dict[uuid.UUID, StreamStorage]:
    """Each stream's storage (None: every stream's); a stream that never stored a frame has none."""
    now = datetime.now(UTC)
    return {
        r["stream_id"]: StreamStorage(
            stream_id=r["stream_id"],
            bytes=r["bytes"],
            frames=r["frames"],
            oldest_frame_at=r["oldest"],
            oldest_frame_age_s=None if r["oldest"] is None else round((now - r["oldest"]).total_seconds(), 1),
            deleted_frames=r["deleted_frames"],
            deleted_bytes=r["deleted_bytes"],
            deleted_events=r["deleted_events"],
            last_deletion_reason=r["last_deletion_reason"],
        )
        for r in await conn.fetch(STREAMS_STORAGE, stream_ids)
    }


async def storage_usage(
    conn: Any, budget: int, stream_ids: list[uuid.UUID] | None = None, *, publish_metrics: bool = False
) -> StorageView:
    """The store's size, per stream and in total, against ``budget`` bytes, with the forecast
    (``conn``: an asyncpg connection or pool). ``stream_ids``: only these streams in ``streams`` (the totals are the whole store's)."""

    total = await conn.fetchrow(
        "SELECT coalesce(sum(bytes), 0)::bigint AS bytes, coalesce(sum(frames), 0)::bigint AS frames,"
        " (SELECT count(*) FROM frame_deletions) AS pending FROM stream_storage"
    )
    rate_row = await conn.fetchrow(RATE)
    per_day = None
    if rate_row is not None and rate_row["span_s"] and float(rate_row["span_s"]) >= 30:
        # a deleted stream takes its counters along: a fall is no negative rate
        per_day = max(
            0.0, (rate_row["stored_now"] - rate_row["stored_then"]) / float(rate_row["span_s"]) * 86400
        )
    if total["bytes"] >= budget:
        days: float | None = 0.0
    elif per_day:
        days = (budget - total["bytes"]) / per_day
    else:
        days = None
    streams = list((await streams_storage(conn, stream_ids)).values())
    view = StorageView(
        bytes=total["bytes"],
        frames=total["frames"],
        budget_bytes=budget,
        used_fraction=round(total["bytes"] / budget, 4),
        pending_deletions=total["pending"],
        stored_bytes_per_day=None if per_day is None else round(per_day),
        days_until_full=None if days is None else round(days, 2),
        streams=streams,
    )
    if publish_metrics:
        STORAGE_TOTAL_BYTES.set(view.bytes)
        STORAGE_BUDGET_BYTES.set(budget)
        STORAGE_DAYS_UNTIL_FULL.set(-1 if days is None else days)
        for s in streams:
            STORAGE_STREAM_BYTES.labels(str(s.stream_id)).set(s.bytes)
    return view
