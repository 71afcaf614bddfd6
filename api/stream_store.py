"""What the API does to streams in Postgres: create one, request its shutdown. Routes stay thin.

Both go through ``core.streams``, the one versioned and audited write of the ``streams`` table,
with their outbox messages in the same transaction, so a message goes out exactly when its change
is stored. The API sends no stop command: it stores ``init_shutdown`` with its state event, and
the stream's lifecycle workflow, the only sender of stops, takes it from there.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg

from api.schemas import AnalyticsFigures, LineFigures, ZoneFigures
from core.messages import EventKind, Service, StartCommand, StateEvent, StreamOptions
from core.outbox import command_message, enqueue, event_message
from core.redact import redact_url
from core.sealing import UrlSealer
from core.settings import Settings
from core.states import StreamState
from core.streams import COLUMNS, StreamRow, count_active, ensure_webhook_secret, insert_stream, record_state


class IdempotencyConflict(Exception):
    """An Idempotency-Key was reused for a different request."""


class CapacityReached(Exception):
    """As many streams as the box may run are not yet inactive."""

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(
            f"{active} streams are active and this box runs at most {limit} (LOOKOUT_MAX_ACTIVE_STREAMS)"
        )


@dataclass(frozen=True)
class InitOutcome:
    stream: StreamRow
    created: bool  # False: an earlier request with the same Idempotency-Key created it
    webhook_secret: str | None = None  # made now for the stream's webhook_url: shown once


async def analytics_figures(
    pool: asyncpg.Pool, streams: list[StreamRow]
) -> dict[uuid.UUID, AnalyticsFigures]:
    """Per stream with zones or lines: its zones' occupancy and counts and its lines' crossings (every
    zone and line of its options, at 0 until its detection process writes them)."""
    wanted = [s for s in streams if s.options.has_analytics]
    if not wanted:
        return {}
    rows = await pool.fetch(
        "SELECT stream_id, name, occupancy, count_in, count_out FROM stream_analytics WHERE stream_id = ANY($1)",
        [s.id for s in wanted],
    )
    stored = {(r["stream_id"], r["name"]): (r["occupancy"], r["count_in"], r["count_out"]) for r in rows}
    figures = {}
    for stream in wanted:
        zones = []
        for zone in stream.options.zones or []:
            occupancy, entered, left = stored.get((stream.id, zone.name), (0, 0, 0))
            zones.append(ZoneFigures(name=zone.name, occupancy=occupancy, entered=entered, left=left))
        lines = []
        for line in stream.options.lines or []:
            _, count_in, count_out = stored.get((stream.id, line.name), (0, 0, 0))
            lines.append(LineFigures(name=line.name, count_in=count_in, count_out=count_out))
        figures[stream.id] = AnalyticsFigures(zones=zones, lines=lines)
    return figures


@dataclass(frozen=True)
class ShutdownOutcome:
    stream: StreamRow
    accepted: bool  # False: it was already inactive, nothing was sent
    repeated: bool = False  # it was already shutting down: the shutdown request was sent again


def _api_event(stream_id: uuid.UUID, state: StreamState) -> StateEvent:
    return StateEvent(stream_id=str(stream_id), service=Service.API, kind=EventKind.PROGRESS, state=state)


async def create_stream(
    pool: asyncpg.Pool,
    *,
    settings: Settings,
    url: str,
    options: StreamOptions,
    idempotency_key: str | None,
) -> InitOutcome:
    """Store a new stream in ``init_startup`` with its start command and ``init_startup`` event.

    The URL is sealed before anything is stored or queued; at most ``max_active_streams`` streams
    may be not yet inactive (``CapacityReached``).
    """
    stream_id = uuid.uuid4()
    sealer = UrlSealer(settings)
    sealed, digest = sealer.seal(url), sealer.digest(url)
    command = StartCommand(stream_id=str(stream_id), url_sealed=sealed, options=options)
    event = _api_event(stream_id, StreamState.INIT_STARTUP)
    async with pool.acquire() as conn, conn.transaction():
        if idempotency_key is not None:
            earlier = await _replay(conn, idempotency_key, digest, options)
            if earlier is not None:
                return InitOutcome(stream=earlier, created=False)
        active = await count_active(conn)
        if active >= settings.max_active_streams:
            raise CapacityReached(active, settings.max_active_streams)
        row = await insert_stream(
            conn,
            stream_id=stream_id,
            url_redacted=redact_url(url),
            url_sealed=sealed,
            url_digest=digest,
            options=options,
            idempotency_key=idempotency_key,
            reason="POST /init",
            source="api",
            event_id=event.event_id,
            outbox=[command_message(settings, command), event_message(settings, event)],
        )
        if row is None:  # the key was taken meanwhile; ON CONFLICT waited for that transaction
            earlier = await _replay(conn, idempotency_key or "", digest, options)
            assert earlier is not None, "ON CONFLICT reported a key that no row holds"
            return InitOutcome(stream=earlier, created=False)
        secret = await ensure_webhook_secret(conn, stream_id, options, sealer)
    return InitOutcome(stream=row, created=True, webhook_secret=secret)


async def _replay(
    conn: asyncpg.Connection, idempotency_key: str, digest: str, options: StreamOptions
) -> StreamRow | None:
    """The stream an earlier request with this key created; IdempotencyConflict when it asked for
    another camera or other options."""
    existing = await conn.fetchrow(
        f"SELECT {COLUMNS}, url_digest FROM streams WHERE idempotency_key = $1", idempotency_key
    )
    if existing is None:
        return None
    earlier = StreamRow.from_record(existing)
    if existing["url_digest"] != digest or earlier.options != options:
        raise IdempotencyConflict
    return earlier


async def request_shutdown(
    pool: asyncpg.Pool, *, settings: Settings, stream_id: uuid.UUID
) -> ShutdownOutcome | None:
    """Move a stream to ``init_shutdown`` with its state event; None for an unknown id.

    Asked again while the stream is still stopping, the event is sent again (a new event id, the
    same state): the first may have been lost on its way, and a lifecycle that has it drops the
    repeat. A stream already inactive is returned as it is.
    """
    event = _api_event(stream_id, StreamState.INIT_SHUTDOWN)
    write = await record_state(
        pool,
        stream_id=stream_id,
        state=StreamState.INIT_SHUTDOWN,
        reason="POST /shutdown",
        source="api",
        event_id=event.event_id,
        outbox=[event_message(settings, event)],
    )
    if write.row is None:
        return None
    if write.applied:
        return ShutdownOutcome(stream=write.row, accepted=True)
    if write.row.state.is_terminal:
        return ShutdownOutcome(stream=write.row, accepted=False)
    async with pool.acquire() as conn:
        await enqueue(conn, [event_message(settings, event)])
    return ShutdownOutcome(stream=write.row, accepted=True, repeated=True)
