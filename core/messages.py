"""Message models of the Kafka contracts (DESIGN.md "Kafka contracts")."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.analytics import MAX_SHAPES, Line, Zone, shapes_problem
from core.inference import Backend, Precision
from core.retention import Retention, StorePolicy
from core.states import StreamState
from core.text import StorableText


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
    """What a state event says: progress in the lifecycle, a stop acknowledgement, an error, or a
    heartbeat (a running service's live figures; it never changes the stored state)."""

    PROGRESS = "progress"
    ACK = "ack"
    ERROR = "error"
    HEARTBEAT = "heartbeat"


class ErrorKind(StrEnum):
    """What an error event means to the lifecycle's supervision."""

    CAMERA = "camera"  # the camera is unreachable (reconnect budget spent): retried for a window
    PROCESS = "process"  # the stream's process died or could not start: the service is restarted
    FATAL = "fatal"  # no restart can help (e.g. the model does not load): the stream ends


class CameraState(StrEnum):
    """Where a capture process stands with its camera."""

    CONNECTING = "connecting"  # not streamed yet
    STREAMING = "streaming"
    RECONNECTING = "reconnecting"  # lost it, trying again within the reconnect budget


class StreamFigures(BaseModel):
    """A service's live figures for one stream, in its heartbeat (counts since its process started)."""

    frames_read: int | None = None  # runner: read from the camera
    frames_published: int | None = None  # runner: sampled and published
    frames_received: int | None = None  # ml: arrived from the frames topic
    frames_processed: int | None = None  # ml: run through the model
    frames_stored: int | None = None  # ml: detection rows inserted
    frames_dropped: int = 0  # oldest-first drops of the service's bounded queue
    fps: float = 0.0  # published (runner) or processed (ml) per second over the last interval
    newest_frame_age_s: float | None = None  # from the newest frame's capture to the heartbeat
    reconnects: int | None = None  # runner: camera connections after the first
    camera: CameraState | None = None  # runner
    queue_depth: int | None = None  # ml: frames waiting for the model
    inference_ms: float | None = None  # ml: mean model time per frame over the last interval
    frames_skipped: int | None = None  # ml: skipped by motion gating (nothing moved), no row stored
    frames_not_stored: int | None = None  # ml: detected, but not stored under the stream's store policy
    backend: str | None = None  # ml: what the detection process runs, e.g. "openvino fp32"
    model_note: str | None = None  # ml: why that precision (e.g. "fp32 (auto): the CPU has no VNNI or AMX")
    engine: str | None = None  # ml: "shared" (the ML instance's engine) or "per-stream"
    engine_lost: int | None = None  # ml: inferences lost in flight when the shared engine died (retried)
    threads: int | None = None  # ml: the detection process's inference threads


def webhook_url_problem(url: str) -> str | None:
    """Why ``url`` cannot receive webhooks, or None; the reason never repeats the URL."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        return "webhook_url is malformed (bad port or host)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "webhook_url must be an http:// or https:// URL with a host"
    if parts.username or parts.password:
        return "webhook_url must not hold credentials: events are signed with the stream's webhook secret"
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return "webhook_url must not contain whitespace or control characters"
    return None


class StreamOptions(BaseModel):
    """Per-stream options chosen at /init; passed to the runner and ML with the start command."""

    model_config = ConfigDict(extra="forbid")

    fps: float | None = Field(default=None, gt=0, le=60, description="Target frames per second")
    confidence: float | None = Field(default=None, ge=0, le=1, description="Minimum confidence")
    classes: list[StorableText] | None = Field(
        default=None, max_length=80, description="Class names to keep (all if unset)"
    )
    imgsz: int | None = Field(default=None, ge=32, le=4096, description="Model input size")
    backend: Backend | None = Field(
        default=None, description="Inference backend for this stream (default: the ML service's ml_backend)"
    )
    precision: Precision | None = Field(
        default=None,
        description="auto, fp32 or int8 (INT8 on openvino and tensorrt, kept only when it agrees with "
        "FP32; auto: INT8 where the CPU has VNNI or AMX)",
    )
    model: str | None = Field(
        default=None,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="A model registered with the ML service (ml_weights), e.g. your own trained YOLO; "
        "default: the service's ml_model. Streams on the same model share its engine",
    )
    motion_gating: bool = Field(
        default=False, description="Skip inference on frames where nothing moves (no row is stored for them)"
    )
    motion_max_skip_s: float | None = Field(
        default=None, gt=0, le=3600, description="With motion gating: detect at least this often all the same"
    )
    zones: list[Zone] | None = Field(
        default=None, max_length=MAX_SHAPES, description="Named polygons: entered, left and dwell events"
    )
    lines: list[Line] | None = Field(
        default=None, max_length=MAX_SHAPES, description="Named segments: crossed events with a direction"
    )
    track: bool | None = Field(
        default=None,
        description="Track objects (motion-gated tracker): a track_id per object; default on with zones or lines",
    )
    store: StorePolicy | None = Field(
        default=None,
        description="Which processed frames are stored: all, objects (frames with objects), changes (when "
        "the tracked objects or their zones change, or every store_every_s while objects stay), events "
        "(frames that carry an event); default: the store_policy setting",
    )
    store_every_s: float | None = Field(
        default=None,
        gt=0,
        le=86400,
        description="With store=changes: a frame at least this often while objects stay",
    )
    retention: Retention | None = Field(
        default=None, description="How long frames and events are kept and the bytes the frames may take"
    )
    webhook_url: str | None = Field(
        default=None,
        max_length=2000,
        description="Every event of the stream is POSTed here, signed (X-Lookout-Signature)",
    )

    @model_validator(mode="after")
    def _analytics_valid(self) -> Self:
        problem = shapes_problem(self.zones, self.lines)
        if problem is not None:
            raise ValueError(problem)
        if self.webhook_url is not None and (problem := webhook_url_problem(self.webhook_url)) is not None:
            raise ValueError(problem)
        return self

    @property
    def tracking(self) -> bool:
        """Whether the stream's objects are tracked: asked for, or implied by zones and lines."""
        if self.track is not None:
            return self.track
        return bool(self.zones or self.lines)

    @property
    def has_analytics(self) -> bool:
        return bool(self.zones or self.lines)


class StartCommand(BaseModel):
    """Start reading and detecting a stream. Carries the camera URL sealed (core/sealing.py): only the
    runner opens it.

    A restart (``replace``) from the lifecycle's watchdog makes the service replace whatever it still
    holds for the stream; ``service`` limits a command to one of them (None: both).
    """

    kind: Literal["start"] = "start"
    command_id: str = Field(default_factory=_new_id)
    stream_id: str
    url_sealed: str
    options: StreamOptions = Field(default_factory=StreamOptions)
    replace: bool = False
    service: Service | None = None
    reason: str | None = None  # why a restart was sent, for the services' logs
    issued_at: datetime = Field(default_factory=_now)

    def is_for(self, service: Service) -> bool:
        return self.service is None or self.service is service


class StopCommand(BaseModel):
    """Stop a stream; every service acknowledges it, even for a stream it never ran."""

    kind: Literal["stop"] = "stop"
    command_id: str = Field(default_factory=_new_id)
    stream_id: str
    reason: str | None = None
    issued_at: datetime = Field(default_factory=_now)


class WatchCommand(BaseModel):
    """Someone watches the stream's live view (api/live.py): its detection process encodes each
    annotated frame for the live topic for ``for_s`` seconds from when ML reads this. The API sends
    it again while anyone watches; when nobody does any more, the encoding stops by itself."""

    kind: Literal["watch"] = "watch"
    stream_id: str
    for_s: float = Field(gt=0, le=60)
    issued_at: datetime = Field(default_factory=_now)


Command = Annotated[StartCommand | StopCommand | WatchCommand, Field(discriminator="kind")]


class CommandEnvelope(BaseModel):
    """Parses either command by its ``kind``."""

    command: Command


def parse_command(raw: bytes) -> StartCommand | StopCommand | WatchCommand:
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
    error_kind: ErrorKind | None = None  # None on an error: a process error
    figures: StreamFigures | None = None  # heartbeats
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
