"""Activities of the StreamLifecycle workflow: read a stream, record its state, send a command.

Each one is idempotent under Temporal's retries: a state is written only when it is later than the
stored one (so a retried write finds it already there), and a command is inserted into the outbox
under a dedupe key derived from its command id.
"""

from __future__ import annotations

import logging
import uuid

import asyncpg
from temporalio import activity

from activities.models import RecordedState, StateChange, StreamRecord
from core.messages import StopCommand
from core.metrics import STATES_RECORDED
from core.settings import Settings
from core.states import StreamState, may_advance

log = logging.getLogger(__name__)


def _as_uuid(stream_id: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(stream_id)
    except ValueError:
        return None


class LifecycleActivities:
    """The lifecycle's activities over one asyncpg pool (the samples-python class pattern)."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings

    @activity.defn(name="load_stream")
    async def load_stream(self, stream_id: str) -> StreamRecord | None:
        """The stream's redacted URL and stored state, or None when no such stream exists."""
        key = _as_uuid(stream_id)
        if key is None:
            return None
        row = await self._pool.fetchrow(
            "SELECT url_redacted, state, error_reason FROM streams WHERE id = $1", key
        )
        if row is None:
            return None
        return StreamRecord(
            stream_id=stream_id,
            url_redacted=row["url_redacted"],
            state=StreamState(row["state"]),
            error_reason=row["error_reason"],
        )

    @activity.defn(name="record_state")
    async def record_state(self, change: StateChange) -> RecordedState:
        """Move the stream to ``change.state`` unless it is already there or later; audit every move."""
        key = _as_uuid(change.stream_id)
        if key is None:
            return RecordedState(applied=False)
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT state, version FROM streams WHERE id = $1 FOR UPDATE", key)
            if row is None:
                return RecordedState(applied=False)
            current = StreamState(row["state"])
            version: int = row["version"]
            if not may_advance(current, change.state):
                return RecordedState(applied=False, state=current, version=version)
            status = await conn.execute(
                """
                UPDATE streams
                   SET state = $2,
                       error_reason = CASE WHEN $2 = 'inactive_error' THEN $3 ELSE error_reason END,
                       version = $4,
                       updated_at = now()
                 WHERE id = $1 AND version = $5
                """,
                key,
                change.state.value,
                change.reason,
                version + 1,
                version,
            )
            if status != "UPDATE 1":  # cannot happen under the row lock; retried by Temporal if it does
                raise RuntimeError(f"stream {change.stream_id} changed under its row lock")
            await conn.execute(
                """
                INSERT INTO stream_events (stream_id, from_state, to_state, version, reason, source, event_id)
                VALUES ($1, $2, $3, $4, $5, $6, $7)
                """,
                key,
                current.value,
                change.state.value,
                version + 1,
                change.reason,
                change.source,
                change.event_id,
            )
        STATES_RECORDED.labels(change.state.value).inc()
        log.info(
            "state recorded",
            extra={
                "stream_id": change.stream_id,
                "from_state": current.value,
                "to_state": change.state.value,
                "version": version + 1,
            },
        )
        return RecordedState(applied=True, state=change.state, version=version + 1)

    @activity.defn(name="send_command")
    async def send_command(self, command: StopCommand) -> bool:
        """Queue a stop command in the outbox (the one publishing path); False when already queued."""
        inserted = await self._pool.fetchval(
            """
            INSERT INTO outbox (topic, key, payload, dedupe_key)
            VALUES ($1, $2, $3, $4)
            ON CONFLICT (dedupe_key) DO NOTHING
            RETURNING id
            """,
            self._settings.topic_commands,
            command.stream_id,
            command.model_dump_json().encode(),
            command_dedupe_key(command.command_id),
        )
        log.info(
            "command queued",
            extra={
                "stream_id": command.stream_id,
                "command": command.kind,
                "command_id": command.command_id,
                "new": inserted is not None,
            },
        )
        return inserted is not None


def command_dedupe_key(command_id: str) -> str:
    """The outbox dedupe key of a command: a retried insert of the same command is a no-op."""
    return f"command:{command_id}"
