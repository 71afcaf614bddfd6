"""Model floor benchmark (not a test): what the model alone can do on this box, before any pipeline.

The ceiling of every end-to-end figure of issue 13: for each backend and precision, on the same 60
frames of the demo clip, the ms/frame of ultralytics ``predict`` (with its pre- and post-processing)
and of the backend's compiled model alone (OpenVINO: ``ov_compiled_model`` on a ready input), at 1
thread and at all cores. From the all-cores figure it prints the most 5 fps streams the model alone
could serve if Lookout cost nothing, and each backend's speed over PyTorch's.

    .venv/bin/python benchmarks/model_floor.py [--imgsz 640] [--frames 60]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / ".lookout" / "models")
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


if __name__ == "__main__":
    main()
