"""Inside one stream's capture process: keep a camera connection alive and publish its sampled frames.

A ``CameraReader`` thread owns the OpenCV connection; this module's asyncio side watches it and
decides: a connection that does not open within the open timeout, or that delivers no frame for
the read timeout (a frozen camera), is abandoned and replaced, with exponential backoff, until the
reconnect budget since the stream was lost is spent; then the failure is reported to the runner and
the process exits. Frames go to the frames topic as raw JPEG with ``FrameHeaders``; the runner is told
once the first frame is out, and twice a second how many frames were read, published and dropped
(it keeps the stream's metrics). The child also stops when the runner dies. The process's entry
point is workers/runner/child.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from core.kafka import close_client, create_producer
from core.messages import CameraState, FrameHeaders
from core.redact import redact_url
from core.retry import delays
from core.timeouts import within
from workers.child_process import EXIT_STOPPED
from workers.runner.frames import EncodedFrame
from workers.runner.messages import (
    EXIT_FAILED,
    CaptureCounts,
    CaptureFailed,
    CaptureSpec,
    FirstFramePublished,
)
from workers.runner.reader import CameraReader
from workers.runner.sampler import FrameSampler

log = logging.getLogger(__name__)

TICK_S = 0.05  # how often the watchdog looks at the reader and the stop event
OPEN_GRACE_S = 1.0  # beyond the open timeout before an open that OpenCV does not end is abandoned
RECONNECT_FIRST_S = 0.5  # the retry policy's waits between camera connections start here ...
RECONNECT_MAX_S = 5.0  # ... and stay this short: a camera back from a reboot is seen within seconds
FRAME_QUEUE_SIZE = 8  # frames waiting for Kafka; the oldest is dropped beyond this
PRODUCER_CLOSE_S = 2.0
COUNTS_INTERVAL_S = 0.5  # how often the frame counts go to the runner (for its metrics)


class CaptureSession:
    """The asyncio side of one capture process: watchdog, reconnects, frame publishing."""

    def __init__(
        self, spec: CaptureSpec, *, should_stop: Callable[[], bool], report: Callable[[object], None]
    ) -> None:
        self.spec = spec
        self._settings = spec.settings
        self._should_stop = should_stop
        self._report = report
        self._sampler = FrameSampler(spec.fps)
        self._queue: asyncio.Queue[EncodedFrame] = asyncio.Queue(maxsize=FRAME_QUEUE_SIZE)
        self._reader: CameraReader | None = None
        self._seq = 0
        self._first_reported = False
        self._read_by_ended_readers = 0
        self.frames_published = 0
        self.frames_dropped = 0
        self.reconnects = 0
        self.camera = CameraState.CONNECTING
        self.newest_capture_ts: float | None = None
        self._log_extra = {"stream_id": spec.stream_id, "url": redact_url(spec.url)}

    @property
    def frames_read(self) -> int:
        """Frames read from the camera over every connection of this session."""
        current = self._reader.frames_grabbed if self._reader is not None else 0
        return self._read_by_ended_readers + current

    def counts(self) -> CaptureCounts:
        """The session's frame counts so far."""
        return CaptureCounts(
            frames_read=self.frames_read,
            frames_published=self.frames_published,
            frames_dropped=self.frames_dropped,
            reconnects=self.reconnects,
            camera=self.camera,
            newest_capture_ts=self.newest_capture_ts,
        )

    async def run(self) -> int:
        """Capture until stopped (``EXIT_STOPPED``) or lost for good (``EXIT_FAILED``, reason reported)."""
        self._loop = asyncio.get_running_loop()
        # a repeated frame is stored once and a lost one is a live frame gone: the leader's ack will do
        producer = create_producer(
            self._settings, client_id=f"lookout-runner-{self.spec.stream_id}", idempotent=False
        )
        try:
            await within(producer.start(), self._settings.runner_reconnect_budget_s)
        except (KafkaError, OSError, TimeoutError) as exc:
            return self._fail(f"cannot reach Kafka: {exc!r}")
        stop = asyncio.create_task(self._wait_for_stop())
        tasks = {
            stop,
            asyncio.create_task(self._supervise()),
            asyncio.create_task(self._publish_frames(producer)),
            asyncio.create_task(self._report_counts()),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if stop in done:
                log.info("capture stopping on request", extra=self._log_extra)
                return EXIT_STOPPED
            finished = done.pop()
            error = finished.exception()
            if error is not None:
                return self._fail(f"capture failed: {error!r}")
            return self._fail(str(finished.result()), camera=True)  # the reconnect budget is spent
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._reader is not None:
                self._reader.abandon()
            await close_client(producer, f"frames producer of {self.spec.stream_id}", PRODUCER_CLOSE_S)
            self._report(self.counts())  # the last counts; the runner reads them before it reaps the child

    def _fail(self, reason: str, *, camera: bool = False) -> int:
        log.error("stream lost", extra={**self._log_extra, "reason": reason})
        self._report(CaptureFailed(reason, camera=camera))
        return EXIT_FAILED

    async def _report_counts(self) -> None:
        """Send the frame counts to the runner whenever they changed, for its per-stream metrics."""
        last = CaptureCounts()
        while True:
            await asyncio.sleep(COUNTS_INTERVAL_S)
            counts = self.counts()
            if counts != last:
                self._report(counts)
                last = counts

    async def _wait_for_stop(self) -> None:
        # The stop event belongs to multiprocessing, and the runner's liveness has no event: poll both.
        while not self._should_stop():  # noqa: ASYNC110
            await asyncio.sleep(TICK_S)

    # --- camera connection ------------------------------------------------------------------------

    async def _supervise(self) -> str:
        """Keep a reader connected; returns the reason once the reconnect budget is spent."""
        settings = self._settings
        open_timeout_s = settings.runner_open_timeout_ms / 1000
        # The budget always leaves room for one full open attempt.
        budget_s = max(settings.runner_reconnect_budget_s, open_timeout_s + OPEN_GRACE_S)
        lost_since = time.monotonic()  # not streaming yet counts as lost since the start
        waits = self._reconnect_waits()
        attempts = 0
        cause: str | None = None  # why the stream was lost (or why it never came up)
        while True:
            attempts += 1
            reader = self._start_reader()
            reason = await self._watch(reader, give_up_at=lost_since + budget_s)
            now = time.monotonic()
            if reader.frames_grabbed or self.camera is not CameraState.CONNECTING:
                self.camera = CameraState.RECONNECTING
            if reader.frames_grabbed:
                # It streamed: this is a fresh loss, with a fresh budget.
                lost_since, waits, attempts, cause = now, self._reconnect_waits(), 0, reason
            elif cause is None:
                cause = reason
            log.warning("camera connection ended", extra={**self._log_extra, "reason": reason})
            give_up_at = lost_since + budget_s
            if now >= give_up_at:
                last = f" (last attempt: {reason})" if reason != cause else ""
                spent = now - lost_since
                return f"{cause}; gave up after {attempts} connection attempt(s) in {spent:.1f}s{last}"
            await asyncio.sleep(min(next(waits), give_up_at - now))
            log.info("reconnecting", extra={**self._log_extra, "attempt": attempts + 1})

    def _reconnect_waits(self) -> Iterator[float]:
        # little jitter: one camera's reconnects race nobody, and the budget must fit its attempts
        return delays(self._settings, initial_s=RECONNECT_FIRST_S, max_s=RECONNECT_MAX_S, jitter_s=0.1)

    def _start_reader(self) -> CameraReader:
        settings = self._settings
        if self._reader is not None:
            self._read_by_ended_readers += self._reader.frames_grabbed
            self.reconnects += 1
        reader = CameraReader(
            url=self.spec.url,
            open_timeout_ms=settings.runner_open_timeout_ms,
            read_timeout_ms=settings.runner_read_timeout_ms,
            sampler=self._sampler,
            max_side=settings.runner_max_side,
            jpeg_quality=settings.runner_jpeg_quality,
            deliver=self._deliver_from_thread,
        )
        self._reader = reader
        reader.start()
        return reader

    async def _watch(self, reader: CameraReader, *, give_up_at: float) -> str:
        """Wait until ``reader`` ends or is judged dead (abandoning it); returns why.

        ``give_up_at`` applies only until the reader delivers its first frame.
        """
        open_timeout_s = self._settings.runner_open_timeout_ms / 1000
        read_timeout_s = self._settings.runner_read_timeout_ms / 1000
        connected = False
        while True:
            await asyncio.sleep(TICK_S)
            if reader.ended.is_set():
                return reader.end_reason
            now = time.monotonic()
            if reader.frames_grabbed and not connected:
                connected = True
                self.camera = CameraState.STREAMING
                log.info("camera connected", extra=self._log_extra)
            last_frame_at = reader.last_frame_at
            reason = None
            if last_frame_at is None:
                if now - reader.started_at > open_timeout_s + OPEN_GRACE_S:
                    reason = f"open did not finish within {open_timeout_s:.1f}s"
            elif now - last_frame_at > read_timeout_s:
                what = "camera frozen" if connected else "camera opened but sent nothing"
                reason = f"{what}: no frame for {now - last_frame_at:.1f}s"
            if reason is None and not connected and now >= give_up_at:
                reason = "still connecting when the reconnect budget ran out"
            if reason is not None:
                reader.abandon()
                return reason

    def _deliver_from_thread(self, frame: EncodedFrame) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the session is over
            self._loop.call_soon_threadsafe(self._enqueue, frame)

    def _enqueue(self, frame: EncodedFrame) -> None:
        if self._queue.full():
            self._queue.get_nowait()  # Kafka is slow: the newest frame matters more than the oldest
            self.frames_dropped += 1
            log.warning("frame dropped", extra={**self._log_extra, "dropped": self.frames_dropped})
        self._queue.put_nowait(frame)

    # --- publishing -------------------------------------------------------------------------------

    async def _publish_frames(self, producer: AIOKafkaProducer) -> None:
        """Publish queued frames in order. While the broker is unreachable a frame that cannot be
        sent is dropped and counted (the queue keeps the newest ones): a broker restart never ends
        the stream, and capture resumes publishing as soon as the producer reconnects."""
        settings = self._settings
        key = self.spec.stream_id.encode()
        while True:
            frame = await self._queue.get()
            # Numbered by the wall clock in milliseconds, never below the last number: a restarted
            # capture process (a new process, a new runner) never reuses a number an earlier one gave.
            self._seq = max(self._seq + 1, time.time_ns() // 1_000_000)
            headers = FrameHeaders(
                stream_id=self.spec.stream_id,
                frame_seq=self._seq,
                capture_ts=frame.capture_ts,
                width=frame.width,
                height=frame.height,
            )
            try:
                await producer.send_and_wait(
                    settings.topic_frames, value=frame.jpeg, key=key, headers=headers.to_kafka()
                )
            except KafkaError as exc:
                self.frames_dropped += 1
                log.warning("frame not published", extra={**self._log_extra, "error": repr(exc)})
                continue
            self.frames_published += 1
            self.newest_capture_ts = frame.capture_ts
            if not self._first_reported:
                self._first_reported = True
                self._report(FirstFramePublished())
