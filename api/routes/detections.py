"""GET /detection_result: a stream's detections, newest first, with fresh links to the annotated frames."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from minio import Minio
from pydantic import BaseModel, Field

from api.auth import AUTH_RESPONSES, ReadKey
from api.deps import DbDep, SettingsDep
from core.detections import DetectedObject
from core.storage import create_s3_client, presigned_get

router = APIRouter(tags=["detections"], responses=AUTH_RESPONSES)

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No stream has this id"}}

PAGE = """
SELECT frame_seq, capture_time, s3_key, width, height, objects
FROM detections
WHERE stream_id = $1 AND ($2::bigint IS NULL OR frame_seq < $2)
ORDER BY frame_seq DESC
LIMIT $3
"""


def get_s3(request: Request, settings: SettingsDep) -> Minio:
    """One S3 client per app, made on first use (signing links needs no request to S3)."""
    client = getattr(request.app.state, "s3", None)
    if client is None:
        client = create_s3_client(settings, public=True)
        request.app.state.s3 = client
    return cast(Minio, client)


S3Dep = Annotated[Minio, Depends(get_s3)]


class Detection(BaseModel):
    """One processed frame of a stream and what was found in it."""

    frame_seq: int = Field(description="The frame's sequence number in its stream")
    capture_time: datetime = Field(description="When the runner read the frame from the camera")
    image_url: str = Field(description="Presigned link to the annotated JPEG, made for this response")
    width: int
    height: int
    objects: list[DetectedObject]


class DetectionPage(BaseModel):
    """A page of a stream's detections, newest first."""

    stream_id: uuid.UUID
    items: list[Detection]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next, older page; null on the last page"
    )
    links_expire_in_s: int = Field(description="How long each image_url stays valid")


MAX_CURSOR = 2**63 - 1  # frame_seq is a bigint


def parse_cursor(cursor: str | None, name: str = "cursor") -> int | None:
    """The number a cursor stands for; 422 unless it is a plain non-negative int64 decimal."""
    if cursor is None:
        return None
    if not re.fullmatch(r"[0-9]{1,19}", cursor) or int(cursor) > MAX_CURSOR:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("query", name),
                    "msg": f"{name} must be a next_cursor value: a whole number from 0 to 2^63-1",
                }
            ]
        )
    return int(cursor)


@router.get("/detection_result", responses=NOT_FOUND)
async def detection_result(
    db: DbDep,
    settings: SettingsDep,
    s3: S3Dep,
    _key: ReadKey,
    stream_id: Annotated[uuid.UUID, Query(alias="id", description="The stream id")],
    limit: Annotated[int, Query(ge=1, le=200, description="Detections per page")] = 20,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
) -> DetectionPage:
    """The stream's detections newest first, each with a fresh link to its annotated image."""
    before = parse_cursor(cursor)
    rows = await db.fetch(PAGE, stream_id, before, limit + 1)
    if not rows and not await db.fetchval("SELECT EXISTS (SELECT 1 FROM streams WHERE id = $1)", stream_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"stream {stream_id} not found")
    page, more = rows[:limit], len(rows) > limit
    expiry = settings.s3_presign_expiry_s
    items = [
        Detection(
            frame_seq=row["frame_seq"],
            capture_time=row["capture_time"],
            image_url=presigned_get(s3, settings.s3_bucket_frames, row["s3_key"], expiry),
            width=row["width"],
            height=row["height"],
            objects=[DetectedObject.model_validate(o) for o in row["objects"]],
        )
        for row in page
    ]
    return DetectionPage(
        stream_id=stream_id,
        items=items,
        next_cursor=str(page[-1]["frame_seq"]) if more else None,
        links_expire_in_s=expiry,
    )


FRAME_GONE = """
SELECT st.deleted_through_seq, st.last_deletion_reason,
       (SELECT max(e.frame_deleted_at) FROM events e WHERE e.stream_id = s.id AND e.frame_seq = $2) AS event_frame_deleted_at
  FROM streams s LEFT JOIN stream_storage st ON st.stream_id = s.id
 WHERE s.id = $1
"""


@router.get(
    "/streams/{stream_id}/frames/{frame_seq}",
    status_code=status.HTTP_307_TEMPORARY_REDIRECT,
    responses={
        307: {"description": "To a fresh presigned link of the annotated frame"},
        404: {"description": "No such stream, or the frame was never stored"},
        410: {
            "description": "The frame was deleted by retention, the storage budget or its stream's deletion"
        },
    },
)
async def frame(
    db: DbDep, settings: SettingsDep, s3: S3Dep, _key: ReadKey, stream_id: uuid.UUID, frame_seq: int
) -> RedirectResponse:
    """A stable link to one annotated frame: a redirect to a fresh presigned link while it is kept,
    410 with the reason once retention deleted it (never a broken image)."""
    if not 0 <= frame_seq <= MAX_CURSOR:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"frame {frame_seq} of stream {stream_id} not found"
        )
    key = await db.fetchval(
        "SELECT s3_key FROM detections WHERE stream_id = $1 AND frame_seq = $2", stream_id, frame_seq
    )
    if key is not None:
        url = presigned_get(s3, settings.s3_bucket_frames, key, settings.s3_presign_expiry_s)
        return RedirectResponse(url, status_code=status.HTTP_307_TEMPORARY_REDIRECT)
    gone = await db.fetchrow(FRAME_GONE, stream_id, frame_seq)
    if gone is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"stream {stream_id} not found")
    through = gone["deleted_through_seq"]
    if gone["event_frame_deleted_at"] is not None or (through is not None and frame_seq <= through):
        reason = gone["last_deletion_reason"] or "age"
        raise HTTPException(
            status.HTTP_410_GONE,
            detail=f"frame {frame_seq} of stream {stream_id} was deleted by retention ({RETENTION_REASONS.get(reason, reason)})",
        )
    raise HTTPException(
        status.HTTP_404_NOT_FOUND,
        detail=f"frame {frame_seq} of stream {stream_id} was never stored (its store policy, or not yet processed)",
    )


RETENTION_REASONS = {
    "age": "older than the stream's frames_days",
    "stream_bytes": "the stream's frames were over its max_bytes; the oldest went first",
    "budget": "the store was over storage_budget_bytes; the oldest frames went first",
    "stream_deleted": "the stream is being deleted",
}
