"""One OpenCV connection to a camera, read on its own thread so that a stuck read never stalls the process.

DESIGN.md: OpenCV's timeouts work only as open parameters, and even then a frozen server blocks a
read for about three read timeouts. So the reader only reports what it sees (opened, the time of the
last frame, how it ended) and the capture session decides when the connection is dead; an abandoned
reader finishes its blocked call in the background, releases the capture and exits.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import cv2

from core.redact import redact_url
from workers.runner.frames import EncodedFrame, encode_frame
from workers.runner.sampler import FrameSampler

# Setting OPENCV_FFMPEG_CAPTURE_OPTIONS at all drops OpenCV's TCP default, so TCP is named. A short
# analysis keeps opening fast: the runner times frames itself and never uses the probed frame rate.
CAPTURE_OPTIONS = "rtsp_transport;tcp|analyzeduration;1000000"
FROZEN_FRACTION = 0.9  # of the read timeout: OpenCV's timer fires a little early or late


def configure_ffmpeg_capture() -> None:
    """Set the FFmpeg capture options for this process (read by OpenCV at every open).

    FFmpeg's own messages are silenced: they may quote the camera URL, password and all, on the
    process's stderr (the service's log); the reader reports every failure in words of its own.
    """
    os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = CAPTURE_OPTIONS
    os.environ["OPENCV_FFMPEG_LOGLEVEL"] = "-8"  # AV_LOG_QUIET


class CameraReader(threading.Thread):
    """Opens ``url``, grabs every frame, and hands the sampled ones, encoded, to ``deliver``.

    Runs until the stream fails or ``abandon()`` is called. ``deliver`` is called on this thread.
    """

    def __init__(
        self,
        *,
        url: str,
        open_timeout_ms: int,
        read_timeout_ms: int,
        sampler: FrameSampler,
        max_side: int,
        jpeg_quality: int,
        deliver: Callable[[EncodedFrame], None],
    ) -> None:
        super().__init__(name=f"camera-reader {redact_url(url)}", daemon=True)
        self._url = url
        self._params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            open_timeout_ms,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            read_timeout_ms,
        ]
        self._read_timeout_s = read_timeout_ms / 1000
        self._sampler = sampler
        self._max_side = max_side
        self._jpeg_quality = jpeg_quality
        self._deliver = deliver
        self._abandoned = threading.Event()
        self.started_at = time.monotonic()
        self.opened_at: float | None = None  # monotonic time the capture opened
        self.last_frame_at: float | None = None  # monotonic time of the last frame grabbed
        self.frames_grabbed = 0
        self.ended = threading.Event()
        self.end_reason = ""

    def abandon(self) -> None:
        """Stop reading; the thread exits as soon as its current OpenCV call returns."""
        self._abandoned.set()

    @property
    def abandoned(self) -> bool:
        return self._abandoned.is_set()

    def run(self) -> None:
        capture: cv2.VideoCapture | None = None
        reason = "abandoned"
        try:
            capture = cv2.VideoCapture(self._url, cv2.CAP_FFMPEG, self._params)
            if self.abandoned:
                return
            if not capture.isOpened():
                reason = "could not open the stream (unreachable, refused or timed out)"
                return
            self.opened_at = self.last_frame_at = time.monotonic()
            self._sampler.reset()
            reason = self._read(capture)
        except Exception as exc:  # a reader must always report how it ended
            reason = f"capture failed: {type(exc).__name__}: {exc}"
        finally:
            if capture is not None:
                capture.release()
            self.end_reason = reason
            self.ended.set()

    def _read(self, capture: cv2.VideoCapture) -> str:
        while not self.abandoned:
            # grab() decodes; retrieve() (colour conversion) is paid only for frames that are published.
            ok = capture.grab()
            now, wall = time.monotonic(), time.time()
            silent = now - (self.last_frame_at or now)
            if silent >= FROZEN_FRACTION * self._read_timeout_s:
                # After a read timeout OpenCV flushes the decoder, so grab() can still succeed with an
                # old frame: a grab that waited this long means the camera went silent either way.
                return f"camera frozen: no frame for {silent:.1f}s (read timed out)"
            if not ok:
                return "lost the stream (read failed)"
            if self.abandoned:
                break
            self.last_frame_at = now
            self.frames_grabbed += 1
            if not self._sampler.take(now):
                continue
            ok, image = capture.retrieve()
            if not ok or image is None:
                continue
            self._deliver(
                encode_frame(image, max_side=self._max_side, jpeg_quality=self._jpeg_quality, capture_ts=wall)
            )
        return "abandoned"
