"""What runs in an inference engine process (workers/ml/engine.py has the protocol and the client):
the model, loaded once (OpenVINO with asynchronous requests, or PyTorch, ONNX Runtime and TensorRT
in batches), and the loop that accepts the streams' processes, takes their requests in arrival
order and answers them. Started and restarted by workers/ml/engines.py.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import pickle
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge, wait
from pathlib import Path
from typing import Any, Protocol

from core.settings import Settings
from workers.ml.engine import (
    EXIT_FATAL,
    FIGURES_INTERVAL_S,
    HANDSHAKE_TIMEOUT_S,
    EngineFailed,
    EngineFigures,
    EngineKey,
    EngineLink,
    EngineReady,
    Infer,
    InferFailed,
    Inferred,
    StopEngine,
    Welcome,
    bound_io,
    chosen_model,
    export_options,
    segment_sizes,
)

log = logging.getLogger(__name__)


class _Client:
    """A stream's process connected to the engine, with its mapped segment."""

    def __init__(self, conn: Connection, segment: mmap.mmap, model: _Model) -> None:
        import numpy as np

        self.conn = conn
        self.segment = segment
        in_bytes, _ = segment_sizes(model.imgsz, model.output_shape)
        self.input = np.ndarray((model.imgsz, model.imgsz, 3), np.uint8, buffer=segment)
        self.output = np.ndarray(model.output_shape, np.float32, buffer=segment, offset=in_bytes)
        self.stream_id = "?"
        self.busy = False  # a request of it is pending or running
        self.closed = False

    def release(self) -> None:
        """Unmap the segment (only when no request of it runs: the model writes into it)."""
        del self.input, self.output
        with contextlib.suppress(BufferError):
            self.segment.close()


@dataclass(eq=False)
class _Request:
    client: _Client
    seq: int
    arrived: float
    started: float = 0.0  # when it went to the model


class _Model(Protocol):
    imgsz: int
    output_shape: tuple[int, ...]
    names: list[str]
    end2end: bool
    label: str
    note: str | None
    slots: int  # runs at once
    batch: int  # most requests per run

    def free_slots(self) -> int: ...

    def run(self, requests: list[_Request], done: Callable[[_Request, float, int, str | None], None]) -> None:
        """Run ``requests``; ``done(request, infer_s, batch, error)`` for each, from any thread."""

    def close(self) -> None:
        """Finish what runs."""


class _OpenVinoModel:
    """One compiled OpenVINO model under the THROUGHPUT hint, fed by an AsyncInferQueue."""

    batch = 1

    def __init__(
        self, path: Path, names: list[str], label: str, note: str | None, imgsz: int, threads: int
    ) -> None:
        import threading

        import openvino as ov
        from openvino.preprocess import ColorFormat, PrePostProcessor

        core = ov.Core()
        xml = path if path.is_file() else next(path.glob("*.xml"))
        model = core.read_model(model=str(xml), weights=xml.with_suffix(".bin"))
        ppp = PrePostProcessor(model)  # uint8 BGR HWC in, as the streams write it
        ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")).set_color_format(
            ColorFormat.BGR
        )
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        ppp.input().preprocess().convert_color(ColorFormat.RGB).convert_element_type(ov.Type.f32).scale(255.0)
        config: dict[str, Any] = {"PERFORMANCE_HINT": "THROUGHPUT"}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        self._compiled = core.compile_model(ppp.build(), "CPU", config)
        self.slots = int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._queue = ov.AsyncInferQueue(self._compiled, self.slots)
        self._queue.set_callback(self._finished)
        self._ov = ov
        self._lock = threading.Lock()
        self._running = 0
        self.imgsz = imgsz
        self.output_shape = tuple(int(d) for d in self._compiled.output(0).shape)[1:]
        self.names, self.label, self.note = names, label, note
        self.end2end = _openvino_end2end(xml)

    def free_slots(self) -> int:
        return self.slots - self._running

    def run(self, requests: list[_Request], done: Callable[[_Request, float, int, str | None], None]) -> None:
        for request in requests:
            with self._lock:
                self._running += 1
            tensor = self._ov.Tensor(request.client.input[None], shared_memory=True)
            self._queue.start_async({0: tensor}, (request, done, time.perf_counter()))

    def _finished(self, infer_request: Any, userdata: tuple[_Request, Any, float]) -> None:
        request, done, started = userdata
        error = None
        try:
            request.client.output[...] = infer_request.get_output_tensor(0).data[0]
        except Exception as err:  # reported to the stream; the engine goes on
            error = f"{type(err).__name__}: {err}"
        with self._lock:
            self._running -= 1
        done(request, time.perf_counter() - started, 1, error)

    def close(self) -> None:
        self._queue.wait_all()


def _openvino_end2end(xml: Path) -> bool:
    """Whether the export's head already did NMS (ultralytics' metadata beside the model)."""
    import yaml

    meta_path = xml.parent / "metadata.yaml"
    if not meta_path.is_file():
        return False
    meta = yaml.safe_load(meta_path.read_text()) or {}
    return bool(meta.get("end2end") or (meta.get("args") or {}).get("nms"))


class _BatchedModel:
    """PyTorch, ONNX Runtime or TensorRT through ultralytics' AutoBackend, one batch at a time."""

    slots = 1

    def __init__(
        self, source: Any, device: str, names: list[str], label: str, note: str | None, imgsz: int, batch: int
    ) -> None:
        import torch
        from ultralytics.nn.autobackend import AutoBackend

        self._torch = torch
        self._device = torch.device(device)
        self._backend = AutoBackend(source, device=self._device, fp16=False, fuse=True, verbose=False)
        self._backend.eval()
        self.imgsz, self.batch = imgsz, batch
        self.names, self.label, self.note = names, label, note
        self.end2end = bool(getattr(self._backend, "end2end", False))
        self._busy = False
        with torch.inference_mode():
            out = self._forward(torch.zeros((1, imgsz, imgsz, 3), dtype=torch.uint8))
        self.output_shape = tuple(out.shape[1:])

    def free_slots(self) -> int:
        return 0 if self._busy else 1

    def _forward(self, frames: Any) -> Any:
        x = frames.to(self._device).permute(0, 3, 1, 2).flip(1).float() / 255.0  # BGR HWC → RGB CHW
        y = self._backend(x)
        return (y[0] if isinstance(y, list | tuple) else y).float().cpu()

    def run(self, requests: list[_Request], done: Callable[[_Request, float, int, str | None], None]) -> None:
        import numpy as np

        torch = self._torch
        self._busy = True
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                out = self._forward(torch.from_numpy(np.stack([r.client.input for r in requests])))
            error = None
        except Exception as err:  # reported to the streams; the engine goes on
            out, error = None, f"{type(err).__name__}: {err}"
        finally:
            self._busy = False
        elapsed = time.perf_counter() - started
        for i, request in enumerate(requests):
            if out is not None:
                request.client.output[...] = out[i].numpy()
            done(request, elapsed, len(requests), error)

    def close(self) -> None:
        pass


def load_engine_model(settings: Settings, key: EngineKey) -> _Model:
    """The model of ``key``, exported or taken from the cache (workers/ml/models.py)."""
    from core.inference import Backend
    from workers.ml.detector import resolve_device, resolve_model

    backend, precision, reason = chosen_model(settings, key)
    yolo, names, prepared = resolve_model(
        key.weights, backend=backend, precision=precision, imgsz=key.imgsz, **export_options(settings)
    )
    note = reason if prepared.note is None else f"{reason}; {prepared.note}"
    threads = settings.ml_cores
    if backend is Backend.OPENVINO:
        return _OpenVinoModel(prepared.path, names, prepared.label, note, key.imgsz, threads)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    if backend is Backend.TORCH:
        device = resolve_device(settings.ml_device)
        return _BatchedModel(
            yolo.model, device, names, prepared.label, note, key.imgsz, settings.ml_engine_batch
        )
    device = "cuda:0" if backend is Backend.TENSORRT else "cpu"
    batch = 1 if backend is Backend.TENSORRT else settings.ml_engine_batch  # exported with a fixed batch
    return _BatchedModel(str(prepared.path), device, names, prepared.label, note, key.imgsz, batch)


STUCK_AFTER_S = 60.0  # a request running this long means the model is stuck
BIND_WAIT_S = 10.0  # an engine of the same model still stopping holds the address a moment


def _listening(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + BIND_WAIT_S
    while True:
        try:
            sock.bind(address)
            break
        except OSError:
            if time.monotonic() >= deadline:
                sock.close()
                raise
            time.sleep(0.1)
    sock.listen(64)
    return sock


class InferenceEngine:
    """The engine's loop: accept streams, take their requests, run them in arrival order, answer."""

    def __init__(
        self, control: Connection, model: _Model, address: str, authkey: bytes, settings: Settings
    ) -> None:
        self.control = control
        self.model = model
        self.authkey = authkey
        self.batch_wait_s = settings.ml_engine_batch_wait_ms / 1000
        self.sock = _listening(address)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.clients: dict[Connection, _Client] = {}
        self.pending: deque[_Request] = deque()
        self.completed: deque[tuple[_Request, float, int, str | None]] = deque()
        self.running: set[_Request] = set()
        self.requests = self.batches = self.failed = 0
        self._stopping = False

    def serve(self) -> None:
        next_figures = time.monotonic() + FIGURES_INTERVAL_S
        while not self._stopping:
            objects: list[Any] = [self.sock, self._wake_r, self.control, *self.clients]
            for ready in wait(objects, timeout=self._timeout()):
                if ready is self.sock:
                    self._accept()
                elif ready == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                elif ready is self.control:
                    self._on_control()
                elif isinstance(ready, Connection) and ready in self.clients:
                    self._on_client(self.clients[ready])
            self._answer()
            self._dispatch()
            self._check_running()
            if time.monotonic() >= next_figures:
                next_figures = time.monotonic() + FIGURES_INTERVAL_S
                self._send_figures()
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):  # stopping whatever happens
            self.model.close()
        self.sock.close()
        for client in list(self.clients.values()):
            self._drop(client)

    def _timeout(self) -> float:
        if self.pending and self.model.batch > 1 and self.model.free_slots() > 0:
            return max(0.0, self.pending[0].arrived + self.batch_wait_s - time.monotonic())
        return FIGURES_INTERVAL_S

    def _on_control(self) -> None:
        try:
            message = self.control.recv()
        except (EOFError, OSError):
            message = StopEngine()  # the service is gone
        if isinstance(message, StopEngine):
            self._stopping = True

    def _accept(self) -> None:
        sock, _ = self.sock.accept()
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.getuid():  # an abstract socket is open to every local user: only our own
            log.warning("connection of another user refused", extra={"uid": uid})
            sock.close()
            return
        conn = Connection(sock.detach())
        try:
            bound_io(conn, HANDSHAKE_TIMEOUT_S)  # a silent or half-written peer cannot stall the engine
            deliver_challenge(conn, self.authkey)
            answer_challenge(conn, self.authkey)
        except Exception as err:  # a stranger on the socket, or a process that died connecting
            log.warning("connection refused", extra={"error": f"{type(err).__name__}"})
            conn.close()
            return
        in_bytes, out_bytes = segment_sizes(self.model.imgsz, self.model.output_shape)
        fd = os.memfd_create("lookout-engine-segment", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, in_bytes + out_bytes)
            segment = mmap.mmap(fd, in_bytes + out_bytes)
            client = _Client(conn, segment, self.model)
            self.clients[conn] = client
            try:
                client.stream_id = str(conn.recv().stream_id)  # Hello
                conn.send(
                    Welcome(
                        self.model.imgsz,
                        self.model.output_shape,
                        self.model.names,
                        self.model.end2end,
                        self.model.label,
                        self.model.note,
                        os.getpid(),
                    )
                )
                reduction.send_handle(conn, fd, 0)
            except (EOFError, OSError, AttributeError, pickle.UnpicklingError):
                self._drop(client)
                return
        finally:
            os.close(fd)  # the mappings keep the segment; it is freed when the last one goes
        log.info("stream connected", extra={"stream_id": client.stream_id, "clients": len(self.clients)})

    def _on_client(self, client: _Client) -> None:
        try:
            message = client.conn.recv()
        except (EOFError, OSError):
            self._drop(client)
            return
        if not isinstance(message, Infer) or client.busy:  # one request at a time per stream
            log.warning("protocol error: stream dropped", extra={"stream_id": client.stream_id})
            self._drop(client)
            return
        client.busy = True
        self.pending.append(_Request(client, message.seq, time.monotonic()))

    def _drop(self, client: _Client) -> None:
        """Forget a stream's process; its segment is unmapped once no request of it runs."""
        if client.closed:
            return
        client.closed = True
        self.clients.pop(client.conn, None)
        client.conn.close()
        was_pending = any(r.client is client for r in self.pending)
        self.pending = deque(r for r in self.pending if r.client is not client)
        if not (client.busy and not was_pending):  # else the model still writes into it: _answer releases it
            client.release()
        log.info("stream disconnected", extra={"stream_id": client.stream_id, "clients": len(self.clients)})

    def _dispatch(self) -> None:
        while self.pending and self.model.free_slots() > 0:
            take = min(self.model.batch, len(self.pending))
            idle_clients = sum(1 for c in self.clients.values() if not c.busy)
            waited = time.monotonic() - self.pending[0].arrived
            if take < self.model.batch and idle_clients > 0 and waited < self.batch_wait_s:
                return  # a batch may still fill: _timeout wakes the loop when the wait is over
            requests = [self.pending.popleft() for _ in range(take)]
            now = time.monotonic()
            for request in requests:
                request.started = now
                self.running.add(request)
            self.batches += 1 if self.model.batch > 1 else len(requests)
            self.model.run(requests, self._done)
            self._answer()

    def _done(self, request: _Request, infer_s: float, batch: int, error: str | None) -> None:
        self.completed.append((request, infer_s, batch, error))
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _answer(self) -> None:
        while self.completed:
            request, infer_s, batch, error = self.completed.popleft()
            self.running.discard(request)
            client = request.client
            client.busy = False
            self.requests += 1
            self.failed += error is not None
            if client.closed:
                client.release()
                continue
            reply: Inferred | InferFailed = (
                Inferred(request.seq, infer_s, batch) if error is None else InferFailed(request.seq, error)
            )
            try:
                client.conn.send(reply)
            except OSError:
                self._drop(client)

    def _check_running(self) -> None:
        """A request the model never finished (a failed run whose callback never came) would hold
        its slot and its stream for good: the engine exits instead, and its supervisor restarts it."""
        if self.running:
            oldest = min(r.started for r in self.running)
            if time.monotonic() - oldest > STUCK_AFTER_S:
                raise RuntimeError(f"a request has run for more than {STUCK_AFTER_S:g}s: the model is stuck")

    def _send_figures(self) -> None:
        with contextlib.suppress(OSError):
            self.control.send(EngineFigures(len(self.clients), self.requests, self.batches, self.failed))


def run_engine(conn: Connection, settings: Settings, key: EngineKey, link: EngineLink) -> None:
    """Entry point of an engine process (forked from the preloading server, workers/ml/preload.py)."""
    from core.lifetime import set_process_name
    from workers.child_process import EXIT_STOPPED, run_child

    set_process_name("lookout-engine")

    def report_crash(err: BaseException) -> None:
        with contextlib.suppress(OSError):
            conn.send(EngineFailed(f"inference engine failed: {type(err).__name__}: {err}", fatal=False))

    def body() -> int:
        try:
            model = load_engine_model(settings, key)
        except Exception as err:
            log.exception("model failed to load", extra={"engine": key.name})
            conn.send(
                EngineFailed(f"model {key.name!r} failed to load: {type(err).__name__}: {err}", fatal=True)
            )
            return EXIT_FATAL
        engine = InferenceEngine(conn, model, link.address(key), link.authkey, settings)
        log.info(
            "inference engine ready",
            extra={"engine": key.name, "backend": model.label, "note": model.note, "slots": model.slots},
        )
        conn.send(EngineReady(model.label, model.note, model.slots))
        engine.serve()
        log.info("inference engine stopped", extra={"engine": key.name, "requests": engine.requests})
        return EXIT_STOPPED

    run_child("ml-engine", None, conn, body, crash_event="inference engine failed", on_crash=report_crash)
