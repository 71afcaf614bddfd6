"""Model floor benchmark (not a test): what the model alone can do on this box, before any pipeline.

The ceiling of every end-to-end figure of issue 13: for each backend and precision, on the same 60
frames of the demo clip, the ms/frame of ultralytics ``predict`` (with its pre- and post-processing)
and of the backend's compiled model alone (OpenVINO: ``ov_compiled_model`` on a ready input), at 1
thread and at all cores. From the all-cores figure it prints the most 5 fps streams the model alone
could serve if Lookout cost nothing, and each backend's speed over PyTorch's.

It also measures the shapes an ML instance can give its CPU inference (``engine_shapes``: OpenVINO
at the precision ``auto`` picks here): N models of one thread each (one per stream, as
``ml_engine=per-stream`` runs), one model under the THROUGHPUT hint with asynchronous requests (the
shared engine, workers/ml/engine.py), and one model at batch N. ``pipeline_bench.py --engine``
takes the best of them as the bare engine its capacities are compared with.

    .venv/bin/python benchmarks/model_floor.py [--imgsz 640] [--frames 60] [--engine-seconds 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from core.inference import Backend, Precision  # noqa: E402
from deploy.camera.clip import ensure_clip  # noqa: E402
from workers.ml.detector import DetectionOptions, load_detector  # noqa: E402

STREAM_FPS = 5.0
RUNS = (
    (Backend.TORCH, Precision.FP32),
    (Backend.ONNX, Precision.FP32),
    (Backend.OPENVINO, Precision.FP32),
    (Backend.OPENVINO, Precision.INT8),
)


def clip_frames(count: int) -> list[np.ndarray]:  # type: ignore[type-arg]
    capture = cv2.VideoCapture(str(ensure_clip()))
    frames = []
    while len(frames) < count:
        ok, image = capture.read()
        if not ok:
            break
        frames.append(image)
    return frames


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def ms_per_call(call, inputs: list) -> float:  # type: ignore[no-untyped-def, type-arg]
    started = time.perf_counter()
    for one in inputs:
        call(one)
    return (time.perf_counter() - started) / len(inputs) * 1000


def _openvino_model_path(imgsz: int, models_dir: Path) -> tuple[Path, str]:
    from core.inference import resolve_precision
    from workers.ml.detector import coco_names, default_weights
    from workers.ml.models import ModelSpec, prepare_model

    precision = resolve_precision(Backend.OPENVINO, Precision.AUTO)
    spec = ModelSpec(default_weights(), Backend.OPENVINO, imgsz, precision, dict(enumerate(coco_names())))
    prepared = prepare_model(spec, models_dir, min_agreement=0.9)
    xml = prepared.path if prepared.path.is_file() else next(prepared.path.glob("*.xml"))
    return xml, prepared.label


def engine_shapes(
    imgsz: int, seconds: float, models_dir: Path, streams: int = 4
) -> tuple[str, dict[str, float]]:
    """Frames/s of the compiled OpenVINO model alone in three shapes (see the module's text), on
    every core; and what ran (e.g. ``openvino fp32``)."""
    import threading

    import openvino as ov

    xml, label = _openvino_model_path(imgsz, models_dir)
    core = ov.Core()
    blob = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    results: dict[str, float] = {}

    # N models of one thread each, each run back to back by its own thread (OpenVINO drops the GIL)
    compiled = [
        core.compile_model(
            str(xml), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1}
        )
        for _ in range(streams)
    ]
    counts = [0] * streams
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        request = compiled[i].create_infer_request()
        while time.perf_counter() < stop:
            request.infer({0: blob})
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results[f"{streams} models, 1 thread each"] = sum(counts) / (time.perf_counter() - started)
    compiled.clear()

    # one model, THROUGHPUT hint, as many async requests as it finds optimal
    model = core.compile_model(str(xml), "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})
    queue = ov.AsyncInferQueue(model, int(model.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    results["1 model, THROUGHPUT, async"] = _async_fps(queue, blob, seconds)

    # one model at batch N
    batched = core.read_model(str(xml))
    batched.reshape([streams, 3, imgsz, imgsz])
    model = core.compile_model(batched, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})
    queue = ov.AsyncInferQueue(model, int(model.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    results[f"1 model, batch {streams}"] = streams * _async_fps(
        queue, np.repeat(blob, streams, axis=0), seconds
    )
    return label, results


def _async_fps(queue: Any, blob: np.ndarray, seconds: float) -> float:  # type: ignore[type-arg]
    done = [0]
    queue.set_callback(lambda request, userdata: done.__setitem__(0, done[0] + 1))
    for _ in range(2 * len(queue)):  # warm-up
        queue.start_async({0: blob})
    queue.wait_all()
    done[0] = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        queue.start_async({0: blob})  # blocks while every request is busy
    queue.wait_all()
    return done[0] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / ".lookout" / "models")
    parser.add_argument("--engine-seconds", type=float, default=10.0, help="each engine shape; 0: none")
    args = parser.parse_args()
    frames = clip_frames(args.frames)
    options = DetectionOptions(imgsz=args.imgsz, confidence=0.25)
    cores = os.cpu_count() or 1
    say(f"{len(frames)} frames of the demo clip at {args.imgsz}, {cores} cores")
    say(f"{'backend':<16}{'threads':>8}{'predict ms':>12}{'model ms':>10}{'fps':>7}{'5 fps streams':>15}")
    best: dict[str, float] = {}
    for backend, precision in RUNS:
        for threads in sorted({1, cores}):
            detector = load_detector(
                "", "cpu", threads, backend=backend, precision=precision, imgsz=args.imgsz,
                cache_dir=args.models_dir,
            )  # fmt: skip
            for frame in frames[:3]:
                detector.detect(frame, options)
            predict_ms = ms_per_call(lambda image, d=detector: d.detect(image, options), frames)
            model_ms = float("nan")
            if backend is Backend.OPENVINO:
                compiled = detector.model.predictor.model.ov_compiled_model  # type: ignore[union-attr]
                blob = np.zeros((1, 3, args.imgsz, args.imgsz), np.float32)
                compiled(blob)
                model_ms = ms_per_call(compiled, [blob] * len(frames))
            fps = 1000 / predict_ms
            if threads == cores:
                best[detector.label] = fps
            say(
                f"{detector.label:<16}{threads:>8}{predict_ms:>12.1f}{model_ms:>10.1f}{fps:>7.1f}"
                f"{fps / STREAM_FPS:>15.1f}"
            )
    torch_fps = best.get("torch fp32")
    if torch_fps:
        ratios = ", ".join(f"{label} {fps / torch_fps:.2f}x" for label, fps in best.items())
        say(f"speed over PyTorch at {cores} threads: {ratios}")
    if args.engine_seconds > 0:
        label, shapes = engine_shapes(args.imgsz, args.engine_seconds, args.models_dir)
        say(f"engine shapes ({label} at {args.imgsz}, the compiled model alone, {cores} cores):")
        for shape, fps in shapes.items():
            say(f"  {shape:<32}{fps:7.1f} frames/s")


if __name__ == "__main__":
    main()
