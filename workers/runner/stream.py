"""The runner's handle on one stream's capture process: start it, hear from it, notice its death, stop it.

A capture process is a fork of a server that has already imported OpenCV, NumPy and the Kafka
client and frozen their heap (``capture_context``; as workers/ml/preload.py does for detection):
a spawned interpreter would hold its own copy of all of that, about 60 MB of PSS per stream.

Nothing here blocks the event loop (workers/child_process.py): the process is started on a worker
thread, its reports and its exit are watched with ``add_reader`` on the report pipe and the process
sentinel (so a child that dies on its own is noticed at once), and a stop waits on those with
timeouts, escalating from the cooperative stop event to SIGTERM and SIGKILL. This module stays
light (no OpenCV): the capture code is imported inside the child.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import forkserver
from multiprocessing.context import ForkServerContext

from core.messages import CameraState
from core.metrics import CAMERA_CONNECTED, CAMERA_RECONNECTS, FRAMES_DROPPED, FRAMES_PUBLISHED, FRAMES_READ
from core.redact import redact_url
from workers.child_process import EXIT_STOPPED, ChildProcess, StopEnding, StopResult
from workers.runner.child import run_capture_process
from workers.runner.messages import (
    EXIT_FAILED,
    CaptureCounts,
    CaptureFailed,
    CaptureSpec,
    FirstFramePublished,
)

log = logging.getLogger(__name__)

STOP_GRACE_S = 1.5  # cooperative stop; the child polls its stop event every 0.1 s
TERMINATE_GRACE_S = 0.5
KILL_GRACE_S = 1.0


@dataclass(frozen=True)
class StopOutcome:
    """How a stop ended: ``error`` is None for a clean, cooperative stop."""

    error: str | None = None


# What a capture process imports before its first frame; the heap is frozen last (see the module text)
CAPTURE_MODULES = ["workers.runner.child", "workers.runner.capture", "cv2", "numpy", "workers.frozen_heap"]


def capture_context() -> ForkServerContext:
    """The multiprocessing context of capture processes: forks of the preloading server."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(CAPTURE_MODULES)  # only the call before the server starts counts
    return context


def start_capture_server() -> None:
    """Start the fork server now (it imports in the background), not with the first stream."""
    capture_context()
    forkserver.ensure_running()


class CaptureProcess:
    """One stream's capture process, seen from the runner's event loop."""

    def __init__(
        self,
        spec: CaptureSpec,
        *,
        on_started: Callable[[CaptureProcess], None],
        on_failed: Callable[[CaptureProcess, str], None],
    ) -> None:
        self.spec = spec
        self._on_started = on_started
        self._on_failed = on_failed
        context = capture_context()
        self._stop = context.Event()
        self._child: ChildProcess[object] = ChildProcess(
            context,
            target=run_capture_process,
            args=(spec, self._stop),
            name=f"lookout-capture-{spec.stream_id}",
            duplex=False,
            on_message=self._handle_report,
            on_exit=self._on_exit,
        )
        self.started = False
        self.failure: str | None = None
        self.camera_failure = False  # the failure is the camera's (unreachable), not the process's
        self.counts = CaptureCounts()

    @property
    def stream_id(self) -> str:
        return self.spec.stream_id

    @property
    def pid(self) -> int | None:
        return self._child.pid

    @property
    def exitcode(self) -> int | None:
        return self._child.exitcode

    @property
    def exited(self) -> bool:
        return self._child.exited

    async def start(self) -> None:
        """Spawn the child (on a worker thread: spawning a fresh interpreter takes a moment)."""
        await self._child.start_on_thread()
        log.info(
            "capture process started",
            extra={"stream_id": self.stream_id, "pid": self.pid, "url": redact_url(self.spec.url)},
        )

    async def stop(self) -> StopOutcome:
        """Stop the child: ask, then SIGTERM, then SIGKILL; returns once it is gone."""
        stopped = await self._child.stop(
            self._stop.set,
            grace_s=STOP_GRACE_S,
            terminate_grace_s=TERMINATE_GRACE_S,
            kill_grace_s=KILL_GRACE_S,
            escalating=self._escalating,
        )
        return StopOutcome(error=self._stop_error(stopped))

    def _escalating(self, step: StopEnding) -> None:
        if step is StopEnding.TERMINATED:
            log.warning(
                "capture process did not stop in time; terminating", extra={"stream_id": self.stream_id}
            )
        else:
            log.warning("capture process ignored SIGTERM; killing", extra={"stream_id": self.stream_id})

    def _stop_error(self, stopped: StopResult) -> str | None:
        match stopped.ending:
            case StopEnding.NOT_RUNNING:
                return self.failure
            case StopEnding.EXITED if stopped.exitcode in (EXIT_STOPPED, EXIT_FAILED):
                return self.failure
            case StopEnding.EXITED:
                return f"capture process exited with code {stopped.exitcode} while stopping"
            case StopEnding.TERMINATED:
                return f"capture process did not stop within {STOP_GRACE_S:.1f}s; terminated"
            case StopEnding.KILLED:
                return f"capture process did not stop within {STOP_GRACE_S:.1f}s; killed"

    def _handle_report(self, report: object) -> None:
        if isinstance(report, FirstFramePublished) and not self.started:
            self.started = True
            self._on_started(self)
        elif isinstance(report, CaptureCounts):
            self._count(report)
        elif isinstance(report, CaptureFailed):
            self.failure = report.reason
            self.camera_failure = report.camera

    def _count(self, counts: CaptureCounts) -> None:
        """Add what the child counted since its last report to the runner's metrics."""
        sid, last = self.stream_id, self.counts
        self.counts = counts
        if counts.frames_read > last.frames_read:
            FRAMES_READ.labels(sid).inc(counts.frames_read - last.frames_read)
        if counts.frames_published > last.frames_published:
            FRAMES_PUBLISHED.labels(sid).inc(counts.frames_published - last.frames_published)
        if counts.frames_dropped > last.frames_dropped:
            FRAMES_DROPPED.labels("runner", sid).inc(counts.frames_dropped - last.frames_dropped)
        if counts.reconnects > last.reconnects:
            CAMERA_RECONNECTS.labels(sid).inc(counts.reconnects - last.reconnects)
        CAMERA_CONNECTED.labels(sid).set(1 if counts.camera is CameraState.STREAMING else 0)

    def _on_exit(self) -> None:
        stopping = self._child.stopping
        log.info(
            "capture process exited",
            extra={"stream_id": self.stream_id, "exitcode": self.exitcode, "stopping": stopping},
        )
        if not stopping:
            reason = self.failure or f"capture process died unexpectedly (exit code {self.exitcode})"
            self.failure = reason
            self._on_failed(self, reason)
