"""What runs inside one stream's capture process: its entry point, spawned by workers/runner/stream.py.

A spawned child starts as a fresh interpreter that imports this module to find its entry, so it
stays light; the capture session (OpenCV, the frames producer) is imported inside the child.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as ProcessEvent

from workers.child_process import run_child
from workers.runner.messages import CaptureSpec

log = logging.getLogger(__name__)


def run_capture_process(reports: Connection, spec: CaptureSpec, stop: ProcessEvent) -> None:
    """Process entry: run the capture session until stopped or lost, then exit with its code."""
    run_child(
        "runner",
        spec.stream_id,
        reports,
        lambda: _capture(reports, spec, stop),
        crash_event="capture process crashed",
    )


def _capture(reports: Connection, spec: CaptureSpec, stop: ProcessEvent) -> int:
    from workers.runner.capture import CaptureSession
    from workers.runner.reader import configure_ffmpeg_capture

    configure_ffmpeg_capture()
    parent = multiprocessing.parent_process()

    def should_stop() -> bool:
        return stop.is_set() or (parent is not None and not parent.is_alive())

    def report(message: object) -> None:
        try:
            reports.send(message)
        except OSError:
            log.warning("runner gone; report dropped", extra={"stream_id": spec.stream_id})

    return asyncio.run(CaptureSession(spec, should_stop=should_stop, report=report).run())
