"""In-memory stand-ins of the lifecycle activities (same names), playing runner and ML on a stop."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from temporalio import activity
from temporalio.client import Client

from activities.models import RecordedState, RestartRequest, StateChange, StreamRecord
from core.health_events import HealthEvent
from core.messages import EventKind, Service, StateEvent, StopCommand
from core.states import StreamState, may_advance

SECRET = "hunter2"


@dataclass
class FakeStream:
    url_full: str
    url_redacted: str
    state: StreamState = StreamState.INIT_STARTUP
    error_reason: str | None = None
    changes: list[StateChange] = field(default_factory=list)
    changed_at: list[datetime] = field(default_factory=list)  # workflow time of each change

    @property
    def states(self) -> list[StreamState]:
        return [change.state for change in self.changes]


class FakeLifecycleStore:
    """The ``streams`` table and outbox in memory; ``answers`` says which services ack which stop.

    ``answers[service] = n`` makes ``service`` acknowledge every stop from the n-th one sent for the
    stream on (1: the first); a service missing from it stays silent.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self.streams: dict[str, FakeStream] = {}
        self.commands: list[StopCommand] = []
        self.restarts: list[RestartRequest] = []
        self.health_events: list[HealthEvent] = []
        self.answers: dict[Service, int] = {Service.RUNNER: 1, Service.ML: 1}

    def add_stream(self, state: StreamState = StreamState.INIT_STARTUP) -> str:
        stream_id = str(uuid.uuid4())
        self.streams[stream_id] = FakeStream(
            url_full=f"rtsp://admin:{SECRET}@cam.local:8554/live",
            url_redacted="rtsp://***@cam.local:8554/live",
            state=state,
        )
        return stream_id

    def stops(self, stream_id: str) -> list[StopCommand]:
        return [command for command in self.commands if command.stream_id == stream_id]

    def restarts_of(self, stream_id: str) -> list[tuple[Service, str]]:
        return [(r.service, r.reason) for r in self.restarts if r.stream_id == stream_id]

    @property
    def activities(self) -> list[Callable[..., Any]]:
        return [
            self.load_stream,
            self.record_state,
            self.send_command,
            self.restart_service,
            self.record_health_event,
        ]

    def health_of(self, stream_id: str) -> list[HealthEvent]:
        return [e for e in self.health_events if e.stream_id == stream_id]

    @activity.defn(name="record_health_event")
    async def record_health_event(self, event: HealthEvent) -> bool:
        if any(known.event_id == event.event_id for known in self.health_events):
            return False
        self.health_events.append(event)
        return True

    @activity.defn(name="restart_service")
    async def restart_service(self, request: RestartRequest) -> bool:
        if any(sent.command_id == request.command_id for sent in self.restarts):
            return True
        stream = self.streams.get(request.stream_id)
        if stream is None or stream.state.is_shutting_down:
            return False
        self.restarts.append(request)
        return True

    @activity.defn(name="load_stream")
    async def load_stream(self, stream_id: str) -> StreamRecord | None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return None
        return StreamRecord(
            stream_id=stream_id,
            url_redacted=stream.url_redacted,
            state=stream.state,
            error_reason=stream.error_reason,
        )

    @activity.defn(name="record_state")
    async def record_state(self, change: StateChange) -> RecordedState:
        stream = self.streams.get(change.stream_id)
        if stream is None:
            return RecordedState(applied=False)
        if not may_advance(stream.state, change.state):
            return RecordedState(applied=False, state=stream.state)
        stream.state = change.state
        if change.state is StreamState.INACTIVE_ERROR:
            stream.error_reason = change.reason
        stream.changes.append(change)
        stream.changed_at.append(activity.info().scheduled_time)
        return RecordedState(applied=True, state=change.state, version=len(stream.changes))

    @activity.defn(name="send_command")
    async def send_command(self, command: StopCommand) -> bool:
        if any(sent.command_id == command.command_id for sent in self.commands):
            return False
        self.commands.append(command)
        sent = len(self.stops(command.stream_id))
        workflow_id = activity.info().workflow_id
        assert workflow_id is not None
        handle = self._client.get_workflow_handle(workflow_id)
        for service, first in sorted(self.answers.items()):
            if sent >= first:
                ack = StateEvent(stream_id=command.stream_id, service=service, kind=EventKind.ACK)
                await handle.signal("state_event", ack)
        return True
