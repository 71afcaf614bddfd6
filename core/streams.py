"""The ``streams`` table: its one row model and the one versioned, audited write of a lifecycle state.

Every state change of a stream goes through ``record_state`` (the API's ``/shutdown`` and the
lifecycle workflow's activity alike): under the row lock it moves the state only forwards, bumps the
version, writes the audit row in ``stream_events`` and queues the outbox messages that the change
causes, all in one transaction. ``insert_stream`` is the first write, by ``/init``.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from pydantic import BaseModel, ConfigDict

from core.messages import Service, StartCommand, StreamOptions
from core.outbox import OutboxMessage, command_message, enqueue
from core.sealing import UrlSealer
from core.settings import Settings
from core.states import StreamState, may_advance

# Every column but url_full (the camera URL, sealed) and url_digest, read only where they are needed.
COLUMNS = (
    "id, state, error_reason, url_redacted, options, version, created_at, updated_at, delete_requested_at"
)
CAPACITY_LOCK = 0x6C6F6F6C  # advisory lock key ("lool") serialising the active-stream count of /init


class StreamRow(BaseModel):
    """A ``streams`` row without ``url_full``."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    state: StreamState
    error_reason: str | None
    url_redacted: str
    options: StreamOptions
    version: int
    created_at: datetime
    updated_at: datetime
    delete_requested_at: datetime | None = None  # DELETE /streams/{id}: the janitor deletes it

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> StreamRow:
        """From an asyncpg record or a psycopg dict row of ``SELECT {COLUMNS}``."""
        return cls.model_validate({name: record[name] for name in COLUMNS.split(", ")})


class StateWrite(BaseModel):
    """What ``record_state`` did: ``row`` is the stored row afterwards (None: no such stream)."""

    applied: bool
    row: StreamRow | None = None


def as_stream_id(value: str | uuid.UUID) -> uuid.UUID | None:
    """The stream id as a UUID; None for text that is not one (no such stream can exist)."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


async def insert_stream(
    conn: asyncpg.Connection,
    *,
    stream_id: uuid.UUID,
    url_redacted: str,
    url_sealed: str,
    url_digest: str,
    options: StreamOptions,
    idempotency_key: str | None,
    reason: str,
    source: str,
    event_id: str,
    outbox: Sequence[OutboxMessage],
) -> StreamRow | None:
    """Insert a stream in ``init_startup`` (version 1) with its audit row and outbox messages; None
    when ``idempotency_key`` is already taken. Call it inside the caller's transaction."""
    record = await conn.fetchrow(
        f"""
        INSERT INTO streams (id, url_redacted, url_full, url_digest, options, state, version, idempotency_key)
        VALUES ($1, $2, $3, $4, $5, $6, 1, $7)
        ON CONFLICT (idempotency_key) DO NOTHING
        RETURNING {COLUMNS}
        """,
        stream_id,
        url_redacted,
        url_sealed,
        url_digest,
        options.model_dump(exclude_none=True),
        StreamState.INIT_STARTUP.value,
        idempotency_key,
    )
    if record is None:
        return None
    await _audit(conn, stream_id, None, StreamState.INIT_STARTUP, 1, reason, source, event_id)
    await enqueue(conn, list(outbox))
    return StreamRow.from_record(record)


async def record_state(
    pool: asyncpg.Pool,
    *,
    stream_id: uuid.UUID,
    state: StreamState,
    reason: str | None,
    source: str,
    event_id: str | None = None,
    outbox: Sequence[OutboxMessage] = (),
) -> StateWrite:
    """Move the stream to ``state`` unless it is already there or later; audit the move and queue
    ``outbox`` with it, in one transaction. Idempotent: a repeated write finds the state stored."""
    async with pool.acquire() as conn, conn.transaction():
        record = await conn.fetchrow(f"SELECT {COLUMNS} FROM streams WHERE id = $1 FOR UPDATE", stream_id)
        if record is None:
            return StateWrite(applied=False)
        current = StreamRow.from_record(record)
        if not may_advance(current.state, state):
            return StateWrite(applied=False, row=current)
        updated = await conn.fetchrow(
            f"""
            UPDATE streams
               SET state = $2,
                   error_reason = CASE WHEN $2 = 'inactive_error' THEN $3 ELSE error_reason END,
                   version = version + 1,
                   updated_at = now()
             WHERE id = $1
            RETURNING {COLUMNS}
            """,
            stream_id,
            state.value,
            reason,
        )
        assert updated is not None, "the row lock keeps the row"
        row = StreamRow.from_record(updated)
        await _audit(conn, stream_id, current.state, state, row.version, reason, source, event_id)
        await enqueue(conn, list(outbox))
    return StateWrite(applied=True, row=row)


async def queue_restart(
    pool: asyncpg.Pool,
    settings: Settings,
    *,
    stream_id: uuid.UUID,
    service: Service,
    reason: str,
    command_id: str,
) -> bool:
    """Queue a restart of ``service`` for a running stream: a start command that replaces whatever
    the service still holds for it, with its audit row (kind ``restart``), in one transaction.

    False when the stream has no row or is already shutting down (nothing to restart). Idempotent
    under retries: the command's dedupe key and its audit row go in together.
    """
    async with pool.acquire() as conn, conn.transaction():
        record = await conn.fetchrow(
            "SELECT state, version, url_full, options FROM streams WHERE id = $1 FOR UPDATE", stream_id
        )
        if record is None or StreamState(record["state"]).is_shutting_down:
            return False
        command = StartCommand(
            command_id=command_id,
            stream_id=str(stream_id),
            url_sealed=record["url_full"],  # sealed as stored: nothing here opens it
            options=StreamOptions.model_validate(record["options"]),
            replace=True,
            service=service,
            reason=reason,
        )
        if await enqueue(conn, [command_message(settings, command)]):
            await conn.execute(
                """
                INSERT INTO stream_events (stream_id, from_state, to_state, version, reason, source, event_id, kind)
                VALUES ($1, $2, $2, $3, $4, 'lifecycle', $5, 'restart')
                """,
                stream_id,
                record["state"],
                record["version"],
                f"restart {service.value}: {reason}",
                command_id,
            )
    return True


class OptionsWrite(BaseModel):
    """What ``update_options`` did: ``row`` afterwards (None: no such stream); ``applied`` False: the
    stream is already shutting down; ``webhook_secret``: made now (shown once), else None."""

    applied: bool
    row: StreamRow | None = None
    webhook_secret: str | None = None


def new_webhook_secret() -> str:
    """A stream's webhook signing secret (HMAC-SHA256 key)."""
    return "whsec_" + secrets.token_urlsafe(32)


async def ensure_webhook_secret(
    conn: asyncpg.Connection, stream_id: uuid.UUID, options: StreamOptions, sealer: UrlSealer
) -> str | None:
    """Give a stream with a webhook_url its signing secret, stored sealed, if it has none; the new
    secret in clear (to show once), else None. Call it inside the caller's transaction."""
    if options.webhook_url is None:
        return None
    secret = new_webhook_secret()
    made = await conn.fetchval(
        "UPDATE streams SET webhook_secret = $2 WHERE id = $1 AND webhook_secret IS NULL RETURNING id",
        stream_id,
        sealer.seal(secret),
    )
    return secret if made is not None else None


async def update_options(
    pool: asyncpg.Pool, settings: Settings, *, stream_id: uuid.UUID, options: StreamOptions, reason: str
) -> OptionsWrite:
    """Store a running stream's new options and send them to ML (a start command for ML only, which
    hands them to the stream's process), with an audit row (kind ``options``), in one transaction."""
    async with pool.acquire() as conn, conn.transaction():
        record = await conn.fetchrow(
            f"SELECT {COLUMNS}, url_full FROM streams WHERE id = $1 FOR UPDATE", stream_id
        )
        if record is None:
            return OptionsWrite(applied=False)
        current = StreamRow.from_record(record)
        if current.state.is_shutting_down:
            return OptionsWrite(applied=False, row=current)
        updated = await conn.fetchrow(
            f"UPDATE streams SET options = $2, updated_at = now() WHERE id = $1 RETURNING {COLUMNS}",
            stream_id,
            options.model_dump(exclude_none=True),
        )
        assert updated is not None, "the row lock keeps the row"
        command = StartCommand(
            stream_id=str(stream_id), url_sealed=record["url_full"], options=options, service=Service.ML
        )
        await enqueue(conn, [command_message(settings, command)])
        await conn.execute(
            """
            INSERT INTO stream_events (stream_id, from_state, to_state, version, reason, source, event_id, kind)
            VALUES ($1, $2, $2, $3, $4, 'api', $5, 'options')
            """,
            stream_id,
            current.state.value,
            current.version,
            reason,
            command.command_id,
        )
        secret = await ensure_webhook_secret(conn, stream_id, options, UrlSealer(settings))
    return OptionsWrite(applied=True, row=StreamRow.from_record(updated), webhook_secret=secret)


async def count_active(conn: asyncpg.Connection) -> int:
    """Streams not yet inactive; under ``CAPACITY_LOCK`` (held to the end of the transaction) no
    other ``/init`` counts at the same time."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", CAPACITY_LOCK)
    count: int = await conn.fetchval(
        "SELECT count(*) FROM streams WHERE state NOT IN ('inactive', 'inactive_error')"
    )
    return count


async def get_stream(pool: asyncpg.Pool, stream_id: uuid.UUID) -> StreamRow | None:
    record = await pool.fetchrow(f"SELECT {COLUMNS} FROM streams WHERE id = $1", stream_id)
    return StreamRow.from_record(record) if record else None


@dataclass(frozen=True)
class ListPosition:
    """Where a page of ``list_streams`` ended: its last stream's place in the order."""

    running: bool
    created_at: datetime
    stream_id: uuid.UUID


RUNNING = "state NOT IN ('inactive', 'inactive_error')"  # the order's first key (an index has it)


async def list_streams(
    pool: asyncpg.Pool,
    *,
    limit: int,
    state: StreamState | None = None,
    running: bool | None = None,
    text: str | None = None,
    after: ListPosition | None = None,
) -> list[StreamRow]:
    """Running streams first, then the ended ones, each newest first; optionally only those in
    ``state``, only running (or ended) ones, only those whose id or redacted URL holds ``text``, and
    only those after ``after`` (the previous page's last)."""
    pattern = None
    if text:
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    records = await pool.fetch(
        f"""
        SELECT {COLUMNS} FROM streams
         WHERE ($1::text IS NULL OR state = $1)
           AND ($2::bool IS NULL OR ({RUNNING}) = $2)
           AND ($3::text IS NULL OR url_redacted ILIKE $3 OR id::text ILIKE $3)
           AND ($4::bool IS NULL OR (({RUNNING}), created_at, id) < ($4, $5::timestamptz, $6::uuid))
         ORDER BY ({RUNNING}) DESC, created_at DESC, id DESC
         LIMIT $7
        """,
        state.value if state else None,
        running,
        pattern,
        after.running if after else None,
        after.created_at if after else None,
        after.stream_id if after else None,
        limit,
    )
    return [StreamRow.from_record(record) for record in records]


async def _audit(
    conn: asyncpg.Connection,
    stream_id: uuid.UUID,
    from_state: StreamState | None,
    to_state: StreamState,
    version: int,
    reason: str | None,
    source: str,
    event_id: str | None,
) -> None:
    await conn.execute(
        """
        INSERT INTO stream_events (stream_id, from_state, to_state, version, reason, source, event_id)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        """,
        stream_id,
        from_state.value if from_state else None,
        to_state.value,
        version,
        reason,
        source,
        event_id,
    )
