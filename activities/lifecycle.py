"""Activities of the StreamLifecycle workflow: read a stream, record its state, send a command.

Each one is idempotent under Temporal's retries: a state is written only when it is later than the
stored one (so a retried write finds it already there), and a command is inserted into the outbox
under a dedupe key derived from its command id.
"""

from __future__ import annotations

import logging

import asyncpg
from temporalio import activity

from activities.models import RecordedState, RestartRequest, StateChange, StreamRecord
from core import streams
from core.health_events import HealthEvent, store_health_event
from core.messages import StopCommand
from core.metrics import HEALTH_EVENTS, STATES_RECORDED
from core.outbox import command_message, enqueue
from core.settings import Settings
from core.streams import as_stream_id, get_stream

log = logging.getLogger(__name__)


class LifecycleActivities:
    """The lifecycle's activities over one asyncpg pool (the samples-python class pattern)."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings

    @activity.defn(name="load_stream")
    async def load_stream(self, stream_id: str) -> StreamRecord | None:
        """The stream's redacted URL and stored state, or None when no such stream exists."""
        key = as_stream_id(stream_id)
        row = await get_stream(self._pool, key) if key is not None else None
        if row is None:
            return None
        return StreamRecord(
            stream_id=stream_id, url_redacted=row.url_redacted, state=row.state, error_reason=row.error_reason
        )

    @activity.defn(name="record_state")
    async def record_state(self, change: StateChange) -> RecordedState:
        """Move the stream to ``change.state`` unless it is already there or later; audit every move."""
        key = as_stream_id(change.stream_id)
        if key is None:
            return RecordedState(applied=False)
        write = await streams.record_state(
            self._pool,
            stream_id=key,
            state=change.state,
            reason=change.reason,
            source=change.source,
            event_id=change.event_id,
        )
        if write.row is None:
            return RecordedState(applied=False)
        if not write.applied:
            return RecordedState(applied=False, state=write.row.state, version=write.row.version)
        STATES_RECORDED.labels(change.state.value).inc()
        log.info(
            "state recorded",
            extra={
                "stream_id": change.stream_id,
                "to_state": change.state.value,
                "version": write.row.version,
            },
        )
        return RecordedState(applied=True, state=change.state, version=write.row.version)

    @activity.defn(name="restart_service")
    async def restart_service(self, request: RestartRequest) -> bool:
        """Queue a restart of one service for a running stream; False when there is nothing to restart."""
        key = as_stream_id(request.stream_id)
        if key is None:
            return False
        queued = await streams.queue_restart(
            self._pool,
            self._settings,
            stream_id=key,
            service=request.service,
            reason=request.reason,
            command_id=request.command_id,
        )
        log.info(
            "restart queued" if queued else "restart not needed: the stream is not running",
            extra={
                "stream_id": request.stream_id,
                "service": request.service.value,
                "reason": request.reason,
            },
        )
        return queued

    @activity.defn(name="record_health_event")
    async def record_health_event(self, event: HealthEvent) -> bool:
        """Store a health event with its outbox message and deliveries; False when stored already."""
        new = await store_health_event(self._pool, self._settings, event)
        if new:
            HEALTH_EVENTS.labels(event.kind.value).inc()
            log.info(
                "health event stored",
                extra={"stream_id": event.stream_id, "kind": event.kind.value, "event_id": event.event_id},
            )
        return new

    @activity.defn(name="send_command")
    async def send_command(self, command: StopCommand) -> bool:
        """Queue a stop command in the outbox (the one publishing path); False when already queued."""
        async with self._pool.acquire() as conn:
            new = await enqueue(conn, [command_message(self._settings, command)])
        log.info(
            "command queued",
            extra={
                "stream_id": command.stream_id,
                "command": command.kind,
                "command_id": command.command_id,
                "new": new == 1,
            },
        )
        return new == 1
