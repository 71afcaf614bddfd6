"""What the API does to streams in Postgres: create, request shutdown, read. Routes stay thin.

Every state change is written together with its audit row and its outbox messages in one
transaction, so a message goes out exactly when its change is stored.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from core.messages import EventKind, Service, StartCommand, StateEvent, StopCommand, StreamOptions
from core.outbox import command_message, enqueue, event_message
from core.redact import redact_url
from core.settings import Settings
from core.states import StreamState

_COLUMNS = "id, state, error_reason, url_redacted, options, version, created_at, updated_at"


class IdempotencyConflict(Exception):
    """An Idempotency-Key was reused for a different request."""


@dataclass(frozen=True)
class StoredStream:
    """A ``streams`` row without ``url_full``."""

    id: uuid.UUID
    state: StreamState
    error_reason: str | None
    url_redacted: str
    options: dict[str, Any]
    version: int
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> StoredStream:
        fields = {name: row[name] for name in _COLUMNS.split(", ")}
        return cls(**{**fields, "state": StreamState(row["state"])})


@dataclass(frozen=True)
class InitOutcome:
    stream: StoredStream
    created: bool  # False: an earlier request with the same Idempotency-Key created it


@dataclass(frozen=True)
class ShutdownOutcome:
    stream: StoredStream
    accepted: bool  # False: it was already inactive, nothing was sent
    repeated: bool = False  # it was already shutting down: the shutdown request was sent again


async def create_stream(
    pool: asyncpg.Pool,
    *,
    settings: Settings,
    url: str,
    options: StreamOptions,
    idempotency_key: str | None,
) -> InitOutcome:
    """Store a new stream in ``init_startup`` with its start command and ``init_startup`` event."""
    stream_id = uuid.uuid4()
    options_json = options.model_dump(exclude_none=True)
    command = StartCommand(stream_id=str(stream_id), url=url, options=options)
    event = StateEvent(
        stream_id=str(stream_id), service=Service.API, kind=EventKind.PROGRESS, state=StreamState.INIT_STARTUP
    )
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"""
            INSERT INTO streams (id, url_redacted, url_full, options, state, version, idempotency_key)
            VALUES ($1, $2, $3, $4, $5, 1, $6)
            ON CONFLICT (idempotency_key) DO NOTHING
            RETURNING {_COLUMNS}
            """,
            stream_id,
            redact_url(url),
            url,
            options_json,
            StreamState.INIT_STARTUP.value,
            idempotency_key,
        )
        if row is None:  # the key is taken; ON CONFLICT waited for the other transaction to commit
            existing = await conn.fetchrow(
                f"SELECT {_COLUMNS}, url_full FROM streams WHERE idempotency_key = $1", idempotency_key
            )
            assert existing is not None, "ON CONFLICT reported a key that no row holds"
            if existing["url_full"] != url or existing["options"] != options_json:
                raise IdempotencyConflict
            return InitOutcome(stream=StoredStream.from_row(existing), created=False)
        await _audit(conn, stream_id, None, StreamState.INIT_STARTUP, 1, "POST /init", event.event_id)
        await enqueue(conn, [command_message(settings, command), event_message(settings, event)])
    return InitOutcome(stream=StoredStream.from_row(row), created=True)


async def request_shutdown(
    pool: asyncpg.Pool, *, settings: Settings, stream_id: uuid.UUID
) -> ShutdownOutcome | None:
    """Move a stream to ``init_shutdown`` with its stop command and event; None for an unknown id."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM streams WHERE id = $1 FOR UPDATE", stream_id)
        if row is None:
            return None
        current = StoredStream.from_row(row)
        if current.state.is_terminal:
            return ShutdownOutcome(stream=current, accepted=False)
        if current.state.is_shutting_down:
            # Asked again while still stopping: the request may have been lost on its way, so it goes
            # out again; a lifecycle that already has it drops the repeat (a new event id, same state).
            repeat = StateEvent(
                stream_id=str(stream_id),
                service=Service.API,
                kind=EventKind.PROGRESS,
                state=StreamState.INIT_SHUTDOWN,
            )
            await enqueue(conn, [event_message(settings, repeat)])
            return ShutdownOutcome(stream=current, accepted=True, repeated=True)
        version = current.version + 1
        updated = await conn.fetchrow(
            f"""
            UPDATE streams SET state = $2, version = $3, updated_at = now()
             WHERE id = $1 AND version = $4
            RETURNING {_COLUMNS}
            """,
            stream_id,
            StreamState.INIT_SHUTDOWN.value,
            version,
            current.version,
        )
        assert updated is not None, "the row lock keeps the version unchanged"
        command = StopCommand(stream_id=str(stream_id), reason="shutdown requested through the API")
        event = StateEvent(
            stream_id=str(stream_id),
            service=Service.API,
            kind=EventKind.PROGRESS,
            state=StreamState.INIT_SHUTDOWN,
        )
        await _audit(
            conn,
            stream_id,
            current.state,
            StreamState.INIT_SHUTDOWN,
            version,
            "POST /shutdown",
            event.event_id,
        )
        await enqueue(conn, [command_message(settings, command), event_message(settings, event)])
    return ShutdownOutcome(stream=StoredStream.from_row(updated), accepted=True)


async def get_stream(pool: asyncpg.Pool, *, stream_id: uuid.UUID) -> StoredStream | None:
    row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM streams WHERE id = $1", stream_id)
    return StoredStream.from_row(row) if row else None


async def list_streams(
    pool: asyncpg.Pool, *, limit: int, state: StreamState | None = None
) -> list[StoredStream]:
    """The newest streams first, optionally only those in ``state``."""
    rows = await pool.fetch(
        f"""
        SELECT {_COLUMNS} FROM streams
         WHERE $1::text IS NULL OR state = $1
         ORDER BY created_at DESC, id
         LIMIT $2
        """,
        state.value if state else None,
        limit,
    )
    return [StoredStream.from_row(row) for row in rows]


async def _audit(
    conn: asyncpg.Connection,
    stream_id: uuid.UUID,
    from_state: StreamState | None,
    to_state: StreamState,
    version: int,
    reason: str,
    event_id: str,
) -> None:
    await conn.execute(
        """
        INSERT INTO stream_events (stream_id, from_state, to_state, version, reason, source, event_id)
        VALUES ($1, $2, $3, $4, $5, 'api', $6)
        """,
        stream_id,
        from_state.value if from_state else None,
        to_state.value,
        version,
        reason,
        event_id,
    )
