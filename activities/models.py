"""Inputs and results of the lifecycle activities (Temporal payloads: never a full RTSP URL)."""

from __future__ import annotations

from pydantic import BaseModel

from core.messages import Service
from core.states import StreamState


class StreamRecord(BaseModel):
    """The part of a ``streams`` row the lifecycle may see; ``url_full`` is deliberately absent."""

    stream_id: str
    url_redacted: str
    state: StreamState
    error_reason: str | None = None


class StateChange(BaseModel):
    """A request to move a stream to ``state``; applied only when it is later in the lifecycle."""

    stream_id: str
    state: StreamState
    reason: str | None = None
    event_id: str | None = None  # the state event that caused the change, kept in the audit row
    source: str = "lifecycle"


class RecordedState(BaseModel):
    """The stored state after ``record_state``; ``state`` is None when the stream does not exist."""

    applied: bool
    state: StreamState | None = None
    version: int | None = None


class RestartRequest(BaseModel):
    """The watchdog's request to restart one service for a stream (the command is built outside the
    workflow: it carries the camera URL, which no Temporal payload may)."""

    stream_id: str
    service: Service
    reason: str
    command_id: str
