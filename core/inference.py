"""Inference backends and precisions: the names users choose (settings, per-stream options) and
how ``auto`` and the detection threads are resolved. Light on purpose: the API validates options
with it, and only a detection process imports the runtimes themselves (workers/ml/)."""

from __future__ import annotations

from enum import StrEnum


class Backend(StrEnum):
    """What runs the YOLO model. ``auto``: CUDA PyTorch when a GPU is present, else OpenVINO."""

    AUTO = "auto"
    TORCH = "torch"
    OPENVINO = "openvino"
    ONNX = "onnx"
    TENSORRT = "tensorrt"  # a CUDA GPU and the `tensorrt` package; ultralytics format="engine"


class Precision(StrEnum):
    """The model's arithmetic. INT8 is calibrated with NNCF (OpenVINO) or TensorRT on frames that ship
    with the project, and kept only when it agrees with FP32 (workers/ml/models.py)."""

    FP32 = "fp32"
    INT8 = "int8"


# the backends whose INT8 export Lookout calibrates; the others run FP32 whatever was asked
INT8_BACKENDS = frozenset({Backend.OPENVINO, Backend.TENSORRT})


def resolve_backend(chosen: Backend, *, cuda_available: bool) -> Backend:
    """The backend ``chosen`` stands for on this machine: ``auto`` becomes PyTorch on a CUDA GPU
    (ultralytics' native path there), else OpenVINO (about 3x PyTorch on a plain CPU)."""
    if chosen is not Backend.AUTO:
        return chosen
    return Backend.TORCH if cuda_available else Backend.OPENVINO


def resolve_precision(backend: Backend, chosen: Precision) -> Precision:
    """INT8 where the backend has a calibrated INT8 export, else FP32."""
    return chosen if backend in INT8_BACKENDS else Precision.FP32


def detection_threads(cores: int, processes: int, fixed: int = 0) -> int:
    """Threads for each of ``processes`` detection processes on ``cores`` cores.

    ``fixed`` > 0 is taken as is. Otherwise the cores are shared out: one process gets them all, and
    from as many processes as cores on each gets one, so the box is busy without two thread pools
    fighting over a core (measured here: OpenVINO yolov10n at 640 runs 14.6 ms with 2 threads in one
    process, 21.7 ms with 1 thread: two 1-thread processes do 92 frames/s, one 2-thread one 68).
    """
    if fixed > 0:
        return fixed
    return max(1, max(1, cores) // max(1, processes))
