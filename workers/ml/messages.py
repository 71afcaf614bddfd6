"""What the ML service and one stream's detection process tell each other over their duplex pipe.

The process pulls frames: it says it is ready (after loading the model, and after each frame), the
service hands it the next frame of the stream's bounded queue, and it detects, draws, uploads and
inserts that frame before asking for another. So the service always knows which frame is in hand,
and everything not yet handed over stays in the queue, where overload drops the oldest.

This module stays light (no torch): both sides import it.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.messages import FrameHeaders, StreamOptions
from workers.ml.engine import EngineKey

# --- service → process ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameToDetect:
    frame_id: int  # the service's handle on the frame, echoed back in FrameDone
    headers: FrameHeaders
    jpeg: bytes
    live: bool = False  # someone watches the stream: send its annotated JPEG back (FrameDone.live_jpeg)


@dataclass(frozen=True)
class UpdateOptions:
    options: StreamOptions


@dataclass(frozen=True)
class SetThreads:
    """Run inference on this many threads (the service shares the cores out among its streams)."""

    threads: int


@dataclass(frozen=True)
class StopProcess:
    """Finish nothing new: exit after the frame in hand (there is none when this is read)."""


# --- process → service ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadyForFrames:
    """The model is loaded and warm; the process waits for its first frame."""

    backend: str = ""  # what runs, e.g. "openvino fp32"
    threads: int | None = None
    note: str | None = None  # why that precision, e.g. why INT8 was refused
    engine: str = "per-stream"  # or "shared": the ML instance's engine runs the model


@dataclass(frozen=True)
class FrameDone:
    """A frame is finished (stored, skipped as empty, duplicate or failed); the process wants another."""

    frame_id: int
    frame_seq: int
    objects: int
    stored: bool  # its detection row was inserted now (False: empty frame, duplicate or failure)
    inference_s: float | None  # None: the model did not run (the frame failed before it)
    total_s: float
    capture_to_row_s: float | None = None  # from the frame's capture time to its row; None: not stored
    error: str | None = None
    skipped: bool = False  # motion gating: nothing moved, the model did not run, no row
    not_stored: bool = False  # detected, but the store policy keeps no frame of it (e.g. empty under objects)
    events: tuple[tuple[str, str], ...] = ()  # (zone or line, kind) of each event stored with it
    untracked: int = 0  # detections that joined no track and started none
    engine_lost: int = 0  # inferences of this frame lost in flight with the shared engine (then retried)
    live_jpeg: bytes | None = None  # the annotated frame, when it was asked for live (FrameToDetect.live)


@dataclass(frozen=True)
class EngineWanted:
    """The process's options name this engine (workers/ml/engine.py): the service starts it if none runs."""

    key: EngineKey


@dataclass(frozen=True)
class StreamClosed:
    """Started by a frame of a stream that has no row or is shutting down: exits without work."""


@dataclass(frozen=True)
class ProcessFailed:
    """The process cannot work; it exits after sending this. ``fatal``: no restart can help (the
    model does not load), else the process itself broke."""

    reason: str
    fatal: bool = False


@dataclass(frozen=True)
class ThreadsSet:
    """The process now runs on this many threads (after a SetThreads)."""

    threads: int


ServiceMessage = FrameToDetect | UpdateOptions | SetThreads | StopProcess
ProcessMessage = ReadyForFrames | FrameDone | ThreadsSet | StreamClosed | ProcessFailed | EngineWanted
