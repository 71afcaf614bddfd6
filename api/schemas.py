"""Request and response bodies of the streams API, and the rules an RTSP URL must pass."""

from __future__ import annotations

import uuid
from datetime import datetime
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from core.health import StreamHealth
from core.messages import StreamOptions
from core.states import StreamState

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
        description="Per service: its latest heartbeat figures, ok | degraded | recovering |"
        " camera_unreachable | lost, restarts so far and the last one's reason (from the lifecycle)",
    )
    health_unavailable: str | None = Field(
        default=None, description="Why ``health`` is null (the stream has ended, Temporal did not answer)"
    )


class StreamList(BaseModel):
    streams: list[StreamView]


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
