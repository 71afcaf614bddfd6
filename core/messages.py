"""Message models of the Kafka contracts (DESIGN.md "Kafka contracts")."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.states import StreamState


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return str(uuid.uuid4())


class Service(StrEnum):
    """Who emitted a state event."""

    API = "api"
    LIFECYCLE = "lifecycle"
    RUNNER = "runner"
    ML = "ml"


class EventKind(StrEnum):
    """What a state event says: progress in the lifecycle, a stop acknowledgement, or an error."""

    PROGRESS = "progress"
    ACK = "ack"
    ERROR = "error"


class StreamOptions(BaseModel):
    """Per-stream options chosen at /init; passed to the runner and ML with the start command."""

    model_config = ConfigDict(extra="forbid")

    fps: float | None = Field(default=None, gt=0, le=60, description="Target frames per second")
    confidence: float | None = Field(default=None, ge=0, le=1, description="Minimum confidence")
    classes: list[str] | None = Field(default=None, description="Class names to keep (all if unset)")
    imgsz: int | None = Field(default=None, ge=32, le=4096, description="Model input size")


class StartCommand(BaseModel):
    """Start reading and detecting a stream. Carries the full URL: only runner and ML read it."""

    kind: Literal["start"] = "start"
    command_id: str = Field(default_factory=_new_id)
    stream_id: str
    url: str
    options: StreamOptions = Field(default_factory=StreamOptions)
    issued_at: datetime = Field(default_factory=_now)


class StopCommand(BaseModel):
    """Stop a stream; every service acknowledges it, even for a stream it never ran."""

    kind: Literal["stop"] = "stop"
    command_id: str = Field(default_factory=_new_id)
    stream_id: str
    reason: str | None = None
    issued_at: datetime = Field(default_factory=_now)


Command = Annotated[StartCommand | StopCommand, Field(discriminator="kind")]


class CommandEnvelope(BaseModel):
    """Parses either command by its ``kind``."""

    command: Command


def parse_command(raw: bytes) -> StartCommand | StopCommand:
    """Parse a commands-topic value; raises ``pydantic.ValidationError`` on bad input."""
    return CommandEnvelope.model_validate_json(b'{"command":' + raw + b"}").command


class StateEvent(BaseModel):
    """A state event on the states topic: progress, an acknowledgement or an error."""

    event_id: str = Field(default_factory=_new_id)
    stream_id: str
    service: Service
    kind: EventKind
    state: StreamState | None = None
    error: str | None = None
    time: datetime = Field(default_factory=_now)


class FrameHeaders(BaseModel):
    """Metadata of one frame; the value on the frames topic is the raw JPEG."""

    stream_id: str
    frame_seq: int
    capture_ts: float  # seconds since the epoch, when the frame was read from the camera
    width: int
    height: int

    def to_kafka(self) -> list[tuple[str, bytes]]:
        return [(name, str(value).encode()) for name, value in self.model_dump().items()]

    @classmethod
    def from_kafka(cls, headers: list[tuple[str, bytes]] | tuple[tuple[str, bytes], ...]) -> FrameHeaders:
        """Parse headers of a frames-topic record; raises ``pydantic.ValidationError`` when incomplete."""
        return cls.model_validate({name: value.decode() for name, value in headers})
