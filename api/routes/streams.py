"""Start, stop, change and inspect streams: POST /init, POST /shutdown, PATCH /streams/{id}, GET /state,
GET /streams."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from api.auth import AUTH_RESPONSES, BODY_RESPONSES, AdminKey, ReadKey
from api.deps import DbDep, InitLimiterDep, SettingsDep, TemporalDep
from api.health import Health, stream_health, streams_health
from api.readiness import TemporalConnection
from api.schemas import (
    MAX_IDEMPOTENCY_KEY_LENGTH,
    AnalyticsFigures,
    InitRequest,
    PatchRequest,
    ShutdownRequest,
    StreamList,
    StreamView,
    stream_url_problem,
)
from api.stream_store import (
    CapacityReached,
    IdempotencyConflict,
    analytics_figures,
    create_stream,
    request_shutdown,
)
from core import metrics
from core.messages import StreamOptions
from core.retention import StorageView, StreamStorage, storage_usage, streams_storage
from core.settings import Settings
from core.states import StreamState
from core.streams import COLUMNS, ListPosition, StreamRow, get_stream, list_streams, update_options
from core.temporal import workflow_id
from core.text import StorableText, text_problem

log = logging.getLogger(__name__)

router = APIRouter(tags=["streams"], responses=AUTH_RESPONSES | BODY_RESPONSES)

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No stream has this id"}}


def to_view(
    stream: StreamRow,
    settings: Settings,
    health: Health = (None, None),
    analytics: AnalyticsFigures | None = None,
    webhook_secret: str | None = None,
    storage: StreamStorage | None = None,
) -> StreamView:
    wid = workflow_id(str(stream.id))
    return StreamView(
        id=stream.id,
        state=stream.state,
        error_reason=stream.error_reason,
        url_redacted=stream.url_redacted,
        options=stream.options,
        version=stream.version,
        created_at=stream.created_at,
        updated_at=stream.updated_at,
        workflow_id=wid,
        workflow_url=f"{settings.temporal_ui_url}/namespaces/{settings.temporal_namespace}/workflows/{wid}",
        health=health[0],
        health_unavailable=health[1],
        analytics=analytics,
        webhook_secret=webhook_secret,
        storage=storage,
        deleting=stream.delete_requested_at is not None,
    )


def _not_found(stream_id: uuid.UUID) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, detail=f"stream {stream_id} not found")


@router.post(
    "/init",
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        409: {"description": "Idempotency-Key reused with a different request"},
        429: {"description": "Too many /init calls with this key; Retry-After says when to try again"},
        503: {"description": "As many streams as this box may run are active"},
    },
)
async def init_stream(
    body: InitRequest,
    db: DbDep,
    settings: SettingsDep,
    response: Response,
    key: AdminKey,
    limiter: InitLimiterDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=MAX_IDEMPOTENCY_KEY_LENGTH,
            description="Retrying /init with the same key returns the same stream",
        ),
    ] = None,
) -> StreamView:
    """Accept a stream: it starts in ``init_startup`` and moves on as the services pick it up."""
    problem = stream_url_problem(body.url, max_length=settings.max_url_length)
    if problem is not None:
        raise RequestValidationError([{"type": "value_error", "loc": ("body", "url"), "msg": problem}])
    if idempotency_key is not None and (key_problem := text_problem(idempotency_key)) is not None:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("header", "idempotency-key"), "msg": key_problem}]
        )
    model = body.options.model
    if model not in (None, "default") and model not in settings.ml_weights:
        known = ", ".join(sorted(["default", *settings.ml_weights]))
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("body", "options", "model"),
              "msg": f"model {model!r} is not registered (LOOKOUT_ML_WEIGHTS); registered: {known}"}]
        )  # fmt: skip
    wait_s = limiter.take(key.id)
    if wait_s is not None:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"more than {limiter.per_minute} /init calls a minute with this key",
            headers={"Retry-After": str(max(1, round(wait_s)))},
        )
    try:
        outcome = await create_stream(
            db, settings=settings, url=body.url, options=body.options, idempotency_key=idempotency_key
        )
    except IdempotencyConflict:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail="Idempotency-Key was already used for a different request"
        ) from None
    except CapacityReached as err:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(err), headers={"Retry-After": "30"}
        ) from None
    stream = outcome.stream
    if outcome.created:
        metrics.API_STREAMS_STARTED.inc()
        log.info("stream accepted", extra={"stream_id": str(stream.id), "url": stream.url_redacted})
    else:
        metrics.API_INIT_REPLAYS.inc()
        response.headers["Idempotent-Replayed"] = "true"
        log.info("stream init replayed", extra={"stream_id": str(stream.id)})
    return to_view(stream, settings, webhook_secret=outcome.webhook_secret)


@router.patch(
    "/streams/{stream_id}",
    responses={409: {"description": "The stream is shutting down or has ended"}, **NOT_FOUND},
)
async def patch_stream(
    body: PatchRequest, db: DbDep, settings: SettingsDep, _admin: AdminKey, stream_id: uuid.UUID
) -> StreamView:
    """Change a running stream's zones, lines, tracking, webhook or detection filters; the change
    reaches its detection process within a second or two. The response holds ``webhook_secret``
    when this request gave the stream its first ``webhook_url``."""
    stream = await get_stream(db, stream_id)
    if stream is None:
        raise _not_found(stream_id)
    changes = body.options.model_dump(exclude_unset=True)
    try:
        options = StreamOptions.model_validate({**stream.options.model_dump(exclude_none=True), **changes})
    except ValidationError as err:  # e.g. a zone named like an existing line
        raise RequestValidationError(
            [
                {"type": "value_error", "loc": ("body", "options", *e["loc"]), "msg": e["msg"]}
                for e in err.errors()
            ]
        ) from None
    write = await update_options(db, settings, stream_id=stream_id, options=options, reason="PATCH /streams")
    if write.row is None:
        raise _not_found(stream_id)
    if not write.applied:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"stream {stream_id} is {write.row.state.value}: its options are final",
        )
    log.info("stream options changed", extra={"stream_id": str(stream_id), "fields": sorted(changes)})
    figures = await analytics_figures(db, [write.row])
    return to_view(write.row, settings, analytics=figures.get(stream_id), webhook_secret=write.webhook_secret)


@router.post(
    "/shutdown",
    status_code=status.HTTP_202_ACCEPTED,
    responses={200: {"description": "Already inactive: nothing was sent"}, **NOT_FOUND},
)
async def shutdown_stream(
    db: DbDep,
    settings: SettingsDep,
    _admin: AdminKey,
    response: Response,
    body: ShutdownRequest | None = None,
    stream_id: Annotated[uuid.UUID | None, Query(alias="id", description="Instead of the body")] = None,
) -> StreamView:
    """Ask a stream to stop (the id in the JSON body or as ``?id=``); 202 and ``init_shutdown``.

    Asked again while the stream is still stopping, the request is sent again (the lifecycle drops
    a repeat it already has), so a user can retry a shutdown whose message was lost.
    """
    target = body.id if body is not None else stream_id
    if target is None:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body", "id"), "msg": "the stream id is required"}]
        )
    outcome = await request_shutdown(db, settings=settings, stream_id=target)
    if outcome is None:
        raise _not_found(target)
    if outcome.repeated:
        log.info(
            "shutdown request sent again", extra={"stream_id": str(target), "state": outcome.stream.state}
        )
    elif outcome.accepted:
        metrics.API_SHUTDOWNS_ACCEPTED.inc()
        log.info("shutdown accepted", extra={"stream_id": str(target)})
    else:
        response.status_code = status.HTTP_200_OK
        log.info("stream already inactive", extra={"stream_id": str(target), "state": outcome.stream.state})
    return to_view(outcome.stream, settings)


@router.get("/state", responses=NOT_FOUND)
async def stream_state(
    db: DbDep,
    settings: SettingsDep,
    temporal: TemporalDep,
    _key: ReadKey,
    stream_id: Annotated[uuid.UUID, Query(alias="id", description="The stream id")],
) -> StreamView:
    """The stream's state, error reason, timestamps, redacted URL and live health."""
    return await _view_or_404(db, settings, temporal, stream_id)


@router.get("/state/{stream_id}", responses=NOT_FOUND)
async def stream_state_by_path(
    db: DbDep, settings: SettingsDep, temporal: TemporalDep, _key: ReadKey, stream_id: uuid.UUID
) -> StreamView:
    """Same as ``GET /state?id=``."""
    return await _view_or_404(db, settings, temporal, stream_id)


@router.get("/streams")
async def streams(
    db: DbDep,
    settings: SettingsDep,
    temporal: TemporalDep,
    _key: ReadKey,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    state: StreamState | None = None,
    running: Annotated[
        bool | None, Query(description="Only running streams (true) or only ended ones (false)")
    ] = None,
    q: Annotated[
        StorableText | None,
        Query(max_length=200, description="Only streams whose id or redacted URL contains this"),
    ] = None,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
) -> StreamList:
    """Streams with their states and live health: running ones first, then ended ones, each newest
    first, a page at a time."""
    after = decode_list_cursor(cursor)
    found = await list_streams(db, limit=limit + 1, state=state, running=running, text=q, after=after)
    found, more = found[:limit], len(found) > limit
    healths = await streams_health(temporal, settings, found)
    figures = await analytics_figures(db, found)
    storage = await streams_storage(db, [s.id for s in found])
    return StreamList(
        streams=[
            to_view(s, settings, h, figures.get(s.id), storage=storage.get(s.id))
            for s, h in zip(found, healths, strict=True)
        ],
        next_cursor=encode_list_cursor(found[-1]) if more else None,
    )


def encode_list_cursor(last: StreamRow) -> str:
    """The opaque cursor of the page that ends with ``last``."""
    place = [not last.state.is_terminal, last.created_at.isoformat(), str(last.id)]
    return base64.urlsafe_b64encode(json.dumps(place).encode()).decode().rstrip("=")


def decode_list_cursor(cursor: str | None) -> ListPosition | None:
    """Where the previous page ended; 422 for anything but a ``next_cursor`` of this API."""
    if cursor is None:
        return None
    try:
        running, created_at, stream_id = json.loads(
            base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        )
        if not isinstance(running, bool) or not isinstance(created_at, str) or not isinstance(stream_id, str):
            raise ValueError("not a cursor")
        return ListPosition(running, datetime.fromisoformat(created_at), uuid.UUID(stream_id))
    except (ValueError, TypeError, UnicodeDecodeError, binascii.Error) as err:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("query", "cursor"), "msg": "cursor must be a next_cursor value"}]
        ) from err


async def _view_or_404(
    db: DbDep, settings: Settings, temporal: TemporalConnection, stream_id: uuid.UUID
) -> StreamView:
    stream = await get_stream(db, stream_id)
    if stream is None:
        raise _not_found(stream_id)
    figures = await analytics_figures(db, [stream])
    storage = await streams_storage(db, [stream.id])
    return to_view(
        stream,
        settings,
        await stream_health(temporal, settings, stream),
        figures.get(stream.id),
        storage=storage.get(stream.id),
    )


@router.delete(
    "/streams/{stream_id}",
    status_code=status.HTTP_202_ACCEPTED,
    responses={**NOT_FOUND, 409: {"description": "The stream is not inactive: shut it down first"}},
)
async def delete_stream(
    db: DbDep, settings: SettingsDep, _admin: AdminKey, stream_id: uuid.UUID
) -> StreamView:
    """Delete an inactive stream with its frames (S3 objects and rows) and events; 202, and the
    janitor deletes them (frames first, then the stream: ``GET /state`` answers 404 once it is
    gone). Pinned events go too: deleting a stream is explicit."""
    async with db.acquire() as conn, conn.transaction():
        record = await conn.fetchrow(f"SELECT {COLUMNS} FROM streams WHERE id = $1 FOR UPDATE", stream_id)
        if record is None:
            raise _not_found(stream_id)
        stream = StreamRow.from_record(record)
        if not stream.state.is_terminal:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                detail=f"stream {stream_id} is {stream.state.value}: shut it down (POST /shutdown) before deleting it",
            )
        record = await conn.fetchrow(
            f"UPDATE streams SET delete_requested_at = coalesce(delete_requested_at, now()) WHERE id = $1"
            f" RETURNING {COLUMNS}",
            stream_id,
        )
    log.info("stream deletion requested", extra={"stream_id": str(stream_id)})
    return to_view(StreamRow.from_record(record), settings)


@router.get("/storage")
async def storage(db: DbDep, settings: SettingsDep, _key: ReadKey) -> StorageView:
    """The store: bytes and frames per stream and in total against the budget, pending deletions,
    the recent rate and the days until the budget is reached."""
    return await storage_usage(db, settings.storage_budget_bytes)
