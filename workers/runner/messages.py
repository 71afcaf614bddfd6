"""What the runner and one stream's capture process tell each other, and how that process exits.

The runner hands the process its ``CaptureSpec`` when spawning it and asks it to stop with an
event; the process reports over a one-way pipe. This module stays light (no OpenCV): both sides
import it.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.messages import CameraState
from core.settings import Settings

EXIT_FAILED = 3  # gave up; the reason was reported over the pipe first (a stop ends with EXIT_STOPPED)


@dataclass(frozen=True)
class CaptureSpec:
    """Everything a capture process needs; pickled to the spawned child."""

    stream_id: str
    url: str
    fps: float
    settings: Settings


@dataclass(frozen=True)
class FirstFramePublished:
    """Child → runner: the stream's first frame is on the frames topic."""


@dataclass(frozen=True)
class CaptureCounts:
    """Child → runner: the stream's figures so far, sent while they change and once more at the end."""

    frames_read: int = 0
    frames_published: int = 0
    frames_dropped: int = 0
    reconnects: int = 0  # camera connections after the first
    camera: CameraState = CameraState.CONNECTING
    newest_capture_ts: float | None = None  # capture time of the newest frame published


@dataclass(frozen=True)
class CaptureFailed:
    """Child → runner: the stream is lost (the child exits next); ``camera``: because the camera
    stayed unreachable for the reconnect budget, not because of the process itself."""

    reason: str
    camera: bool = False
