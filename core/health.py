"""The live health of a running stream: what its lifecycle's watchdog knows of each service.

The lifecycle workflow holds it (its ``health`` query, which the Temporal Web UI shows too) and the
API returns it with ``GET /state``; both read this one model.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field

from core.messages import Service, StreamFigures

# The lifecycle workflow's query that answers a StreamHealth.
HEALTH_QUERY = "health"


class HealthStatus(StrEnum):
    """How one service is doing with a running stream, as the lifecycle's watchdog sees it."""

    STARTING = "starting"  # the stream has just started: no heartbeat or first frame yet
    OK = "ok"
    DEGRADED = "degraded"  # running, but its bounded queue dropped frames since the last heartbeat
    RECOVERING = "recovering"  # restarted by the watchdog: waiting for it to run again
    CAMERA_UNREACHABLE = "camera_unreachable"  # runner: the camera does not answer; retried
    LOST = "lost"  # no heartbeat for the liveness timeout


class ServiceHealth(BaseModel):
    """One service's health for a stream: its latest figures and what the watchdog did about it."""

    status: HealthStatus = HealthStatus.STARTING
    figures: StreamFigures | None = None
    last_heartbeat_at: datetime | None = None
    restarts: int = 0
    last_restart_at: datetime | None = None
    last_restart_reason: str | None = None
    restart_times: list[datetime] = Field(default_factory=list)  # within the budget's window
    restarts_unanswered: int = 0  # restarts since its last heartbeat: the backoff grows with them
    counts_reset_expected: bool = False  # a restart was sent: its next heartbeat's counts begin again


class StreamHealth(BaseModel):
    """The live health of a running stream, held by its lifecycle (the ``health`` query)."""

    services: dict[Service, ServiceHealth] = Field(default_factory=dict)
    supervised_since: datetime | None = None  # the stream reached ml_started
    # the runner is watched from the stream's start on: a start lost in a handover is sent again
    runner_watched_since: datetime | None = None
    camera_unreachable_since: datetime | None = None
    camera_error: str | None = None  # the runner's last word on the camera during an outage
    camera_retries: int = 0
    next_camera_retry_at: datetime | None = None
    # health events (core/health_events.py): the open episodes and whether they were announced
    camera_down_since: datetime | None = None  # the first sign: a heartbeat reconnecting, a camera error
    camera_offline_announced: bool = False
    failing_since: datetime | None = None  # a service lost the stream and is being restarted
    failing_reason: str | None = None
    failure_announced: bool = False
