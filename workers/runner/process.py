"""The runner's handle on one stream's capture process: spawn it, hear from it, notice its death, stop it.

Nothing here blocks the event loop: the process is started on a worker thread, its reports and its
exit are watched with ``add_reader`` on the report pipe and the process sentinel (so a child that
dies on its own is noticed at once), and a stop waits on those with timeouts, escalating from the
cooperative stop event to SIGTERM and SIGKILL. This module stays light (no OpenCV): the capture
code is imported inside the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as ProcessEvent

from core.metrics import FRAMES_DROPPED, FRAMES_PUBLISHED, FRAMES_READ
from core.redact import redact_url
from core.settings import Settings

log = logging.getLogger(__name__)

STOP_GRACE_S = 1.5  # cooperative stop; the child polls its stop event every 0.1 s
TERMINATE_GRACE_S = 0.5
KILL_GRACE_S = 1.0

EXIT_STOPPED = 0  # stopped on request
EXIT_FAILED = 3  # gave up; the reason was reported over the pipe first


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
    """Child → runner: the stream's frame counts so far, sent while they change and once more at the end."""

    frames_read: int = 0
    frames_published: int = 0
    frames_dropped: int = 0


@dataclass(frozen=True)
class CaptureFailed:
    """Child → runner: the stream is lost for good (reconnect budget spent); the child exits next."""

    reason: str


@dataclass(frozen=True)
class StopOutcome:
    """How a stop ended: ``error`` is None for a clean, cooperative stop."""

    error: str | None = None


def _capture_main(spec: CaptureSpec, stop: ProcessEvent, reports: Connection) -> None:
    # Entry point of the spawned child; the heavy imports happen only there.
    from workers.runner.capture import run_capture_process

    run_capture_process(spec, stop, reports)


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
        self._process: BaseProcess | None = None
        self._stop: ProcessEvent | None = None
        self._reports: Connection | None = None
        self._exited = asyncio.Event()
        self._reaping: asyncio.Task[None] | None = None
        self._stopping = False
        self.started = False
        self.failure: str | None = None
        self.exitcode: int | None = None
        self.counts = CaptureCounts()

    @property
    def stream_id(self) -> str:
        return self.spec.stream_id

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    async def start(self) -> None:
        """Spawn the child (on a worker thread: spawning a fresh interpreter takes a moment)."""
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        reports, child_end = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_capture_main,
            args=(self.spec, self._stop, child_end),
            name=f"lookout-capture-{self.stream_id}",
            daemon=True,  # never outlives the runner
        )
        self._process, self._reports = process, reports
        try:
            await asyncio.to_thread(process.start)
        finally:
            child_end.close()  # the runner keeps only its end, so the pipe reports EOF once the child is gone
        loop = asyncio.get_running_loop()
        loop.add_reader(reports.fileno(), self._read_reports)
        loop.add_reader(process.sentinel, self._on_sentinel)
        log.info(
            "capture process started",
            extra={"stream_id": self.stream_id, "pid": process.pid, "url": redact_url(self.spec.url)},
        )

    async def stop(self) -> StopOutcome:
        """Stop the child: ask, then SIGTERM, then SIGKILL; returns once it is gone."""
        if self._process is None or self.exited:
            return StopOutcome(error=self.failure)
        self._stopping = True
        assert self._stop is not None
        self._stop.set()
        if await self._wait_exited(STOP_GRACE_S):
            if self.exitcode in (EXIT_STOPPED, EXIT_FAILED):
                return StopOutcome(error=self.failure)
            return StopOutcome(error=f"capture process exited with code {self.exitcode} while stopping")
        log.warning("capture process did not stop in time; terminating", extra={"stream_id": self.stream_id})
        self._process.terminate()
        if await self._wait_exited(TERMINATE_GRACE_S):
            return StopOutcome(error=f"capture process did not stop within {STOP_GRACE_S:.1f}s; terminated")
        log.warning("capture process ignored SIGTERM; killing", extra={"stream_id": self.stream_id})
        self._process.kill()
        await self._wait_exited(KILL_GRACE_S)
        return StopOutcome(error=f"capture process did not stop within {STOP_GRACE_S:.1f}s; killed")

    async def _wait_exited(self, within_s: float) -> bool:
        try:
            await asyncio.wait_for(self._exited.wait(), within_s)
        except TimeoutError:
            return False
        return True

    def _read_reports(self) -> None:
        assert self._reports is not None
        try:
            while self._reports.poll():
                self._handle_report(self._reports.recv())
        except (EOFError, OSError):
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._reports.fileno())

    def _handle_report(self, report: object) -> None:
        if isinstance(report, FirstFramePublished) and not self.started:
            self.started = True
            self._on_started(self)
        elif isinstance(report, CaptureCounts):
            self._count(report)
        elif isinstance(report, CaptureFailed):
            self.failure = report.reason

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

    def _on_sentinel(self) -> None:
        assert self._process is not None
        asyncio.get_running_loop().remove_reader(self._process.sentinel)
        self._reaping = asyncio.create_task(self._reap())

    async def _reap(self) -> None:
        # The sentinel is readable: the child is gone. Read what it said before dying, then reap it.
        assert self._process is not None and self._reports is not None
        self._read_reports()
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self._reports.fileno())
        # The kernel closes the child's files a moment before its exit status can be collected.
        await asyncio.to_thread(self._process.join, 5.0)
        self.exitcode = self._process.exitcode
        self._reports.close()
        with contextlib.suppress(ValueError):
            self._process.close()
        self._exited.set()
        log.info(
            "capture process exited",
            extra={"stream_id": self.stream_id, "exitcode": self.exitcode, "stopping": self._stopping},
        )
        if not self._stopping:
            reason = self.failure or f"capture process died unexpectedly (exit code {self.exitcode})"
            self.failure = reason
            self._on_failed(self, reason)
