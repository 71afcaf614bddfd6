"""The ML service's side of one stream: its bounded frame queue and its detection process.

Everything here runs on the service's event loop and never blocks it for long: the process's pipe
and exit are watched with ``add_reader`` (workers/child_process.py), and a frame is written to the
pipe only when the process has asked for one (so it is reading).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from multiprocessing.context import ForkServerContext
from typing import Generic, Protocol, TypeVar

from core.messages import FrameHeaders, StreamFigures, StreamOptions
from core.metrics import (
    ANALYTICS_EVENTS,
    CAPTURE_TO_ROW_SECONDS,
    DETECTIONS_STORED,
    ENGINE_LOST,
    FRAMES_DROPPED,
    FRAMES_NOT_STORED,
    FRAMES_PROCESSED,
    FRAMES_SKIPPED,
    INFERENCE_SECONDS,
    ML_QUEUE_DEPTH,
    UNTRACKED_DETECTIONS,
)
from core.settings import Settings
from workers.child_process import ChildProcess, StopEnding
from workers.ml.child import run_detection_process
from workers.ml.engine import EngineKey, EngineLink
from workers.ml.messages import (
    EngineWanted,
    FrameDone,
    FrameToDetect,
    ProcessFailed,
    ProcessMessage,
    ReadyForFrames,
    SetThreads,
    StopProcess,
    StreamClosed,
    ThreadsSet,
    UpdateOptions,
)
from workers.ml.preload import detection_context

log = logging.getLogger(__name__)

TERMINATE_GRACE_S = 3.0  # after SIGTERM; then SIGKILL, and the exit is awaited however long it takes

T = TypeVar("T")


class FrameQueue(Generic[T]):
    """A bounded FIFO that drops its oldest item to make room, counting what it dropped."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("a frame queue holds at least one frame")
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self.dropped = 0
        self.high_water = 0

    def offer(self, item: T) -> T | None:
        """Append ``item``; returns the oldest item when it had to be dropped to stay bounded."""
        evicted = None
        if len(self._items) >= self.maxsize:
            evicted = self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        self.high_water = max(self.high_water, len(self._items))
        return evicted

    def take(self) -> T | None:
        return self._items.popleft() if self._items else None

    def drain(self) -> list[T]:
        items = list(self._items)
        self._items.clear()
        return items

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class QueuedFrame:
    """A frame waiting for its stream's process; ``token`` is settled once the frame is done with."""

    token: Hashable
    headers: FrameHeaders
    jpeg: bytes


class StreamListener(Protocol):
    """What the service hears from a stream: settled frames, the first processed frame, a failure."""

    def frame_settled(self, token: Hashable) -> None: ...

    def first_frame_processed(self, stream_id: str) -> None: ...

    def stream_failed(self, stream_id: str, reason: str, *, fatal: bool = False) -> None: ...

    def stream_closed(self, stream_id: str) -> None: ...

    def engine_wanted(self, stream_id: str, key: EngineKey) -> None: ...

    def live_frame(self, stream_id: str, headers: FrameHeaders, jpeg: bytes) -> None: ...


@dataclass
class StreamStats:
    """Counters of one stream in this service."""

    received: int = 0
    handed: int = 0  # frames given to the process
    processed: int = 0  # frames the process finished (stored, empty, duplicate, failed or skipped)
    stored: int = 0
    dropped: int = 0  # dropped by the bounded queue under overload
    discarded: int = 0  # still queued when the stream stopped
    queue_high_water: int = 0
    busy_at_stop: bool = False  # a frame was in hand when the stop came (and was let finish)
    inference_s: float = 0.0  # model time of the processed frames, summed
    inferred: int = 0  # frames that went through the model
    skipped: int = 0  # motion gating: nothing moved, the model did not run
    not_stored: int = 0  # detected, but its store policy keeps no frame of it
    engine_lost: int = 0  # inferences lost in flight when the shared engine died (retried)
    newest_capture_ts: float | None = None  # capture time of the newest frame finished


class StreamProcess:
    """One stream's detection process (a fork of the preloading server), fed from a bounded drop-oldest queue."""

    def __init__(
        self,
        settings: Settings,
        stream_id: str,
        options: StreamOptions | None,
        listener: StreamListener,
        *,
        threads: int = 1,
        context: ForkServerContext | None = None,
        link: EngineLink | None = None,
    ) -> None:
        self.stream_id = stream_id
        self.threads = threads  # asked of the process; what it runs on is in self.running_threads
        self.running_threads: int | None = None
        self.ready = False  # the process has loaded its model and asked for its first frame
        self.backend: str | None = None  # what the process runs, once it is ready
        self.model_note: str | None = None  # why that precision
        self.engine: str | None = None  # "shared" or "per-stream", once it is ready
        self.queue: FrameQueue[QueuedFrame] = FrameQueue(settings.ml_queue_size)
        self.stats = StreamStats()
        self._listener = listener
        self._child: ChildProcess[ProcessMessage] = ChildProcess(
            context or detection_context(),
            target=run_detection_process,
            args=(settings, stream_id, options, threads, link),
            name=f"lookout-ml-{stream_id}",
            duplex=True,
            on_message=self._on_message,
            on_exit=self._on_exit,
        )
        self._wants_frame = False
        self._in_hand: tuple[int, QueuedFrame] | None = None
        self._next_frame_id = 0
        self._started_reported = False
        self._ended = False  # failed, closed or stopping: no more frames go to the process
        self._inference_seen = (0, 0.0)  # (frames inferred, seconds) at the last figures()
        self._watched_until = 0.0  # monotonic: until then, frames go to the process marked live

    @property
    def pid(self) -> int | None:
        return self._child.pid

    @property
    def exitcode(self) -> int | None:
        return self._child.exitcode

    def start(self) -> None:
        """Spawn the process and watch its pipe and its exit from the event loop."""
        self._child.start()
        log.info("detection process started", extra={"stream_id": self.stream_id, "pid": self.pid})

    def offer(self, frame: QueuedFrame) -> None:
        """Queue a frame for the process; under overload the oldest queued frame is dropped."""
        self.stats.received += 1
        if self._ended:
            self._listener.frame_settled(frame.token)
            return
        evicted = self.queue.offer(frame)
        self.stats.dropped = self.queue.dropped
        self.stats.queue_high_water = self.queue.high_water
        if evicted is not None:
            FRAMES_DROPPED.labels("ml", self.stream_id).inc()
            self._listener.frame_settled(evicted.token)
            if self.queue.dropped == 1 or self.queue.dropped % 100 == 0:
                log.warning(
                    "frames dropped under overload",
                    extra={"stream_id": self.stream_id, "dropped": self.queue.dropped},
                )
        self._hand_over()

    def figures(self) -> StreamFigures:
        """The stream's live figures now; the mean inference time covers the frames since the last call."""
        stats = self.stats
        inferred, inference_s = self._inference_seen
        self._inference_seen = (stats.inferred, stats.inference_s)
        count = stats.inferred - inferred
        newest = stats.newest_capture_ts
        ML_QUEUE_DEPTH.labels(self.stream_id).set(len(self.queue))
        return StreamFigures(
            frames_received=stats.received,
            frames_processed=stats.processed - stats.skipped,  # through the model
            frames_stored=stats.stored,
            frames_dropped=stats.dropped,
            queue_depth=len(self.queue),
            inference_ms=round(1000 * (stats.inference_s - inference_s) / count, 2) if count > 0 else None,
            newest_frame_age_s=round(max(0.0, time.time() - newest), 3) if newest is not None else None,
            frames_skipped=stats.skipped,
            frames_not_stored=stats.not_stored,
            backend=self.backend,
            threads=self.running_threads,
            model_note=self.model_note,
            engine=self.engine,
            engine_lost=stats.engine_lost if self.engine == "shared" else None,
        )

    def set_threads(self, threads: int) -> None:
        """Have the process run inference on ``threads`` threads (sent once per change)."""
        if threads != self.threads and not self._ended:
            self.threads = threads
            self._child.send(SetThreads(threads))

    def watch(self, for_s: float) -> None:
        """Someone watches the stream's live view: have its annotated frames for ``for_s`` more seconds."""
        self._watched_until = max(self._watched_until, time.monotonic() + for_s)

    @property
    def watched(self) -> bool:
        return time.monotonic() < self._watched_until

    def update_options(self, options: StreamOptions) -> None:
        if not self._ended:
            self._child.send(UpdateOptions(options))

    async def stop(self, grace_s: float, *, settle_unfinished: bool = True) -> str | None:
        """Let the frame in hand finish, then end the process; returns an error text when forced.

        Queued frames not yet handed over are discarded. A process still busy after ``grace_s``
        (e.g. S3 down for longer) is terminated, and the frame it held is reported lost. With
        ``settle_unfinished`` False (the service shutting down or handing the stream to another
        member) discarded and lost frames stay unsettled, so their records are delivered again.
        """
        self._ended = True
        self.stats.busy_at_stop = self._in_hand is not None
        for frame in self.queue.drain():
            self.stats.discarded += 1
            if settle_unfinished:
                self._listener.frame_settled(frame.token)
        error = None

        def escalating(step: StopEnding) -> None:
            nonlocal error
            if step is not StopEnding.TERMINATED:
                return
            if self._in_hand is not None:
                error = (
                    f"frame {self._in_hand[1].headers.frame_seq} not finished within {grace_s:g}s "
                    "of the stop; detection process terminated"
                )
            log.warning("detection process terminated", extra={"stream_id": self.stream_id, "error": error})

        await self._child.stop(
            lambda: self._child.send(StopProcess()),
            grace_s=grace_s,
            terminate_grace_s=TERMINATE_GRACE_S,
            kill_grace_s=None,
            escalating=escalating,
        )
        if settle_unfinished:
            self._release_in_hand()
        log.info(
            "detection process stopped",
            extra={"stream_id": self.stream_id, "exitcode": self.exitcode, **self._stats_fields()},
        )
        return error

    # --- pipe ----------------------------------------------------------------------------------

    def _hand_over(self) -> None:
        if not self._wants_frame or self._ended:
            return
        frame = self.queue.take()
        if frame is None:
            return
        frame_id = self._next_frame_id
        self._next_frame_id += 1
        self._in_hand = (frame_id, frame)
        self._wants_frame = False
        self.stats.handed += 1
        self._child.send(
            FrameToDetect(frame_id=frame_id, headers=frame.headers, jpeg=frame.jpeg, live=self.watched)
        )

    def _on_message(self, message: ProcessMessage) -> None:
        if isinstance(message, ReadyForFrames):
            self.ready = True
            self.backend, self.running_threads = message.backend or None, message.threads
            self.model_note, self.engine = message.note, message.engine
            log.info(
                "detection process ready",
                extra={
                    "stream_id": self.stream_id,
                    "backend": self.backend,
                    "engine": self.engine,
                    "note": message.note,
                },
            )
            self._wants_frame = True
            self._hand_over()
        elif isinstance(message, EngineWanted):
            self._listener.engine_wanted(self.stream_id, message.key)
        elif isinstance(message, ThreadsSet):
            self.running_threads = message.threads
        elif isinstance(message, FrameDone):
            self._on_frame_done(message)
        elif isinstance(message, ProcessFailed):
            self._end()
            self._listener.stream_failed(self.stream_id, message.reason, fatal=message.fatal)
        elif isinstance(message, StreamClosed):
            log.info(
                "stream without a row or shutting down: nothing to detect",
                extra={"stream_id": self.stream_id},
            )
            self._end()
            self._listener.stream_closed(self.stream_id)

    def _on_frame_done(self, done: FrameDone) -> None:
        self.stats.processed += 1
        self.stats.stored += int(done.stored)
        self._count(done)
        if self._in_hand is not None and self._in_hand[0] == done.frame_id:
            if done.live_jpeg is not None:
                self._listener.live_frame(self.stream_id, self._in_hand[1].headers, done.live_jpeg)
            self.stats.newest_capture_ts = self._in_hand[1].headers.capture_ts
            self._listener.frame_settled(self._in_hand[1].token)
            self._in_hand = None
        if not self._started_reported:
            self._started_reported = True
            self._listener.first_frame_processed(self.stream_id)
        self._wants_frame = True
        self._hand_over()

    def _count(self, done: FrameDone) -> None:
        """The process's report of a frame, into the stream's stats and metrics."""
        sid = self.stream_id
        if done.skipped:
            self.stats.skipped += 1
            FRAMES_SKIPPED.labels(sid).inc()
        if done.not_stored:
            self.stats.not_stored += 1
            FRAMES_NOT_STORED.labels(sid).inc()
        if done.inference_s is not None:
            self.stats.inference_s += done.inference_s
            self.stats.inferred += 1
            FRAMES_PROCESSED.labels(sid).inc()
            INFERENCE_SECONDS.labels(sid).observe(done.inference_s)
        if done.stored:
            DETECTIONS_STORED.labels(sid).inc()
        for zone, kind in done.events:
            ANALYTICS_EVENTS.labels(sid, zone, kind).inc()
        if done.untracked:
            UNTRACKED_DETECTIONS.labels(sid).inc(done.untracked)
        if done.engine_lost:
            self.stats.engine_lost += done.engine_lost
            ENGINE_LOST.labels(sid).inc(done.engine_lost)
        if done.capture_to_row_s is not None:
            CAPTURE_TO_ROW_SECONDS.labels(sid).observe(done.capture_to_row_s)

    def _on_exit(self) -> None:
        if not self._ended:  # neither stopping nor failed: it died
            self._end()
            self._listener.stream_failed(
                self.stream_id, f"detection process exited unexpectedly (exit code {self.exitcode})"
            )

    # --- end -----------------------------------------------------------------------------------

    def _end(self) -> None:
        """No more frames for this process: settle the queued ones (a failed stream keeps nothing)."""
        self._ended = True
        for frame in self.queue.drain():
            self.stats.discarded += 1
            self._listener.frame_settled(frame.token)

    def _release_in_hand(self) -> None:
        if self._in_hand is not None:
            self._listener.frame_settled(self._in_hand[1].token)
            self._in_hand = None

    def _stats_fields(self) -> dict[str, object]:
        s = self.stats
        return {
            "received": s.received,
            "handed": s.handed,
            "processed": s.processed,
            "stored": s.stored,
            "dropped": s.dropped,
            "skipped": s.skipped,
            "not_stored": s.not_stored,
            "discarded": s.discarded,
            "queue_high_water": s.queue_high_water,
            "busy_at_stop": s.busy_at_stop,
        }
