"""Payloads of the StreamLifecycle workflow, shared by the workflow, its starter and the bridge."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from core.messages import Service, StateEvent
from core.states import StreamState


class LifecycleCarry(BaseModel):
    """What one run hands to the next through continue-as-new."""

    state: StreamState
    url_redacted: str | None = None
    startup_deadline_at: datetime | None = None  # None once the stream runs
    acknowledged: list[Service] = Field(default_factory=list)
    failed: dict[Service, str] = Field(default_factory=dict)
    seen_event_ids: list[str] = Field(default_factory=list)
    pending_events: list[StateEvent] = Field(default_factory=list)
    events_received: int = 0


class LifecycleParams(BaseModel):
    """Input of ``StreamLifecycle.run``; the deadlines come from the settings of the starter."""

    stream_id: str
    startup_deadline_s: float = Field(gt=0)
    ack_deadline_s: float = Field(gt=0)
    # A run continues as new past this many history events, so a long-lived stream stays small.
    max_history_events: int = Field(default=2000, ge=50)
    carry: LifecycleCarry | None = None


class LifecycleStatus(BaseModel):
    """Answer of the ``current_state`` query and result of the workflow."""

    stream_id: str
    state: StreamState | None  # None: no such stream in Postgres
    error_reason: str | None = None
    acknowledged: list[Service] = Field(default_factory=list)
    events_received: int = 0
