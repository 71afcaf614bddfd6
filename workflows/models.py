"""Payloads of the StreamLifecycle workflow, shared by the workflow, its starter and the bridge."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from core.health import StreamHealth
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
    health: StreamHealth | None = None


class LifecycleParams(BaseModel):
    """Input of ``StreamLifecycle.run``; the deadlines come from the settings of the starter."""

    stream_id: str
    startup_deadline_s: float = Field(gt=0)
    ack_deadline_s: float = Field(gt=0)
    # A run continues as new past this many history events, so a long-lived stream stays small.
    max_history_events: int = Field(default=2000, ge=50)
    # The watchdog (defaults for runs started before it existed)
    liveness_timeout_s: float = Field(default=20.0, gt=0)
    restart_budget: int = Field(default=10, ge=0)
    restart_window_s: float = Field(default=3600.0, gt=0)
    restart_backoff_max_s: float = Field(default=300.0, gt=0)
    camera_retry_s: float = Field(default=600.0, ge=0)  # 0: for ever
    health_debounce_s: float = Field(default=10.0, ge=0)  # health events: an episode this long is told
    carry: LifecycleCarry | None = None


class LifecycleStatus(BaseModel):
    """Answer of the ``current_state`` query and result of the workflow."""

    stream_id: str
    state: StreamState | None  # None: no such stream in Postgres
    error_reason: str | None = None
    acknowledged: list[Service] = Field(default_factory=list)
    events_received: int = 0
