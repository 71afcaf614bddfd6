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
    with the project, and kept only when it agrees with FP32 (workers/ml/models.py). ``auto``: INT8
    where the CPU multiplies 8-bit integers natively (VNNI or AMX), else FP32."""

    AUTO = "auto"
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


# CPU flags (as /proc/cpuinfo names them) of native 8-bit integer dot products: where INT8 pays
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_int8_flags(cpuinfo: str | None = None) -> list[str]:
    """The INT8_CPU_FLAGS this CPU has (Linux; elsewhere none)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as file:
                cpuinfo = file.read()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return [flag for flag in INT8_CPU_FLAGS if flag in flags]


def resolve_precision(backend: Backend, chosen: Precision, int8_flags: list[str] | None = None) -> Precision:
    """INT8 where the backend has a calibrated INT8 export, else FP32; ``auto`` is INT8 on a CPU
    backend when the CPU has ``int8_flags`` (VNNI or AMX; None: this CPU's), else FP32."""
    if backend not in INT8_BACKENDS:
        return Precision.FP32
    if chosen is not Precision.AUTO:
        return chosen
    flags = cpu_int8_flags() if int8_flags is None else int8_flags
    return Precision.INT8 if backend is Backend.OPENVINO and flags else Precision.FP32


def precision_reason(backend: Backend, chosen: Precision, int8_flags: list[str] | None = None) -> str:
    """Why ``resolve_precision`` picks what it picks, for logs and health."""
    resolved = resolve_precision(backend, chosen, int8_flags)
    if backend not in INT8_BACKENDS:
        return f"fp32: {backend.value} has no calibrated int8"
    if chosen is not Precision.AUTO:
        return f"{resolved.value}: asked for"
    flags = cpu_int8_flags() if int8_flags is None else int8_flags
    if resolved is Precision.INT8:
        return f"int8 (auto): the CPU has {', '.join(flags)}"
    if backend is not Backend.OPENVINO:
        return "fp32 (auto): int8 is picked automatically only on the CPU"
    return "fp32 (auto): the CPU has no VNNI or AMX, where int8 would not pay"


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
