"""Request and response bodies of the streams API, and the rules an RTSP URL must pass."""

from __future__ import annotations

import uuid
from datetime import datetime
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from core.analytics import MAX_SHAPES, Line, Zone
from core.health import StreamHealth
from core.messages import StreamOptions
from core.retention import StreamStorage
from core.states import StreamState
from core.text import StorableText

ALLOWED_SCHEMES = ("rtsp", "rtsps")
MAX_IDEMPOTENCY_KEY_LENGTH = 200


class InitRequest(BaseModel):
    """Start detecting objects in an RTSP stream."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        description="rtsp:// or rtsps:// URL with a host; credentials in it are kept out of every response",
        examples=["rtsp://camera.local:8554/live"],
    )
    options: StreamOptions = Field(default_factory=StreamOptions)


class ShutdownRequest(BaseModel):
    """Stop a stream."""

    model_config = ConfigDict(extra="forbid")

    id: uuid.UUID = Field(description="The stream id returned by POST /init")


class ZoneFigures(BaseModel):
    name: str
    occupancy: int = Field(description="Tracked objects standing in the zone now")
    entered: int
    left: int


class LineFigures(BaseModel):
    name: str
    count_in: int = Field(
        serialization_alias="in", description="Crossings from the left of first→second point"
    )
    count_out: int = Field(serialization_alias="out")

    model_config = ConfigDict(serialize_by_alias=True)


class AnalyticsFigures(BaseModel):
    """Per zone its occupancy and counts, per line its crossings in each direction (since the stream
    started; occupancy as its detection process last saw it)."""

    zones: list[ZoneFigures]
    lines: list[LineFigures]


class OptionsPatch(BaseModel):
    """Options of a running stream to change; a field left out keeps its value, null clears it."""

    model_config = ConfigDict(extra="forbid")

    confidence: float | None = Field(default=None, ge=0, le=1)
    classes: list[StorableText] | None = Field(default=None, max_length=80)
    motion_gating: bool | None = None
    motion_max_skip_s: float | None = Field(default=None, gt=0, le=3600)
    zones: list[Zone] | None = Field(default=None, max_length=MAX_SHAPES)
    lines: list[Line] | None = Field(default=None, max_length=MAX_SHAPES)
    track: bool | None = None
    webhook_url: str | None = Field(default=None, max_length=2000)


class PatchRequest(BaseModel):
    """Change a running stream's analytics and detection options; they reach its processes."""

    model_config = ConfigDict(extra="forbid")

    options: OptionsPatch


class StreamView(BaseModel):
    """A stream as the API shows it: never the full URL, only the redacted one."""

    id: uuid.UUID
    state: StreamState
    error_reason: str | None = Field(description="Why the stream ended in inactive_error")
    url_redacted: str = Field(description="The stream URL with any credentials replaced by ***")
    options: StreamOptions
    version: int = Field(description="Incremented by every state change")
    created_at: datetime
    updated_at: datetime
    workflow_id: str = Field(description="The stream's StreamLifecycle workflow in Temporal")
    workflow_url: str = Field(description="The workflow in the Temporal Web UI")
    health: StreamHealth | None = Field(
        default=None,
        description="Per service: its latest heartbeat figures, starting | ok | degraded | recovering |"
        " camera_unreachable | lost, restarts so far and the last one's reason (from the lifecycle)",
    )
    health_unavailable: str | None = Field(
        default=None, description="Why ``health`` is null (the stream has ended, Temporal did not answer)"
    )
    analytics: AnalyticsFigures | None = Field(
        default=None, description="With zones or lines: occupancy per zone, crossings per line"
    )
    webhook_secret: str | None = Field(
        default=None,
        description="The stream's webhook signing secret: shown once, in the response that made it",
    )
    storage: StreamStorage | None = Field(
        default=None, description="Its frames kept now, the oldest one's age, and what retention deleted"
    )
    deleting: bool = Field(
        default=False, description="An admin deleted the stream: its frames, events and row are going"
    )


class StreamList(BaseModel):
    streams: list[StreamView] = Field(description="Running streams first, then ended ones, each newest first")
    next_cursor: str | None = Field(default=None, description="Pass as `cursor` for the next page")


def stream_url_problem(url: str, *, max_length: int) -> str | None:
    """Why ``url`` cannot be a stream URL, or None when it can; the reason never repeats the URL."""
    if len(url) > max_length:
        return f"URL is {len(url)} characters long; the limit is {max_length}"
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return "URL must not contain whitespace or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError when the port is not a number in range
    except ValueError:
        return "URL is malformed (bad port or host)"
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        # the scheme is not echoed: in 'user:password@host' it would be the user name
        return "URL scheme must be rtsp or rtsps" + ("" if scheme else " (none given)")
    if not parts.hostname:
        return "URL has no host"
    if port == 0:
        return "URL port must be between 1 and 65535"
    return None
