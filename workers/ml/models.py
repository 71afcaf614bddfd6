"""Exported models, made once from the configured weights and cached on disk.

An entry of the cache is one export of one weights file::

    <models_dir>/<weights sha256, 16 hex>/<backend>-<imgsz>-<precision>[-dynamic]/
        lookout.json        what it is: weights, backend, size, precision, versions, export time,
                            and for INT8 its agreement with FP32
        model_openvino_model/ | model.onnx | model.engine     what ultralytics exported

It is built by ultralytics' own exporter (``YOLO(weights).export(format=...)``), offline, in a
hidden folder renamed into place when complete, under a file lock: two processes that need the same
entry export it once, and a crash leaves no half entry. Nothing is ever downloaded. PyTorch needs
no entry: it runs the weights themselves.

INT8 (OpenVINO through NNCF, TensorRT through its calibrator) is calibrated on frames that ship with
the project: every 10th frame of the demo clip, plus ultralytics' ``bus.jpg`` and ``zidane.jpg``.
Then its boxes are compared with FP32's on the clip's other frames (same class, IoU >= 0.5); below
``ml_int8_min_agreement`` the INT8 entry is kept only as a record and the stream runs FP32.

Imported only inside detection processes (it pulls in ultralytics and torch).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.resources
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
import yaml

from core.inference import Backend, Precision

log = logging.getLogger(__name__)

MANIFEST = "lookout.json"
CALIBRATION_STEP = 10  # every 10th frame of the clip calibrates; the frames between check agreement
AGREEMENT_IOU = 0.5
MAX_CHECK_FRAMES = 80
INSTALLED_CLIP = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")

_FORMATS = {Backend.OPENVINO: "openvino", Backend.ONNX: "onnx", Backend.TENSORRT: "engine"}
_RUNTIMES = {Backend.OPENVINO: "openvino", Backend.ONNX: "onnxruntime", Backend.TENSORRT: "tensorrt"}


class ModelUnavailable(RuntimeError):
    """The model cannot be made for this backend here (e.g. TensorRT without a CUDA GPU)."""


@dataclass(frozen=True)
class ModelSpec:
    """What a detection process runs: the weights, on which backend, at which size and precision."""

    weights: Path
    backend: Backend  # resolved: never AUTO
    imgsz: int
    precision: Precision
    names: dict[int, str]  # class names written into the export's metadata

    @property
    def entry_name(self) -> str:
        return entry_name(self.backend, self.imgsz, self.precision)


@dataclass(frozen=True)
class PreparedModel:
    """A model ready to load: ``path`` is what ``YOLO()`` takes."""

    path: Path
    backend: Backend
    precision: Precision
    exported_now: bool = False  # this call made the export (False: taken from the cache)
    note: str | None = None  # e.g. why INT8 was refused

    @property
    def label(self) -> str:
        return f"{self.backend.value} {self.precision.value}"


def weights_digest(path: Path) -> str:
    """The first 16 hex digits of the weights file's SHA-256: the cache key of its exports."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def prepare_model(
    spec: ModelSpec,
    cache_dir: Path,
    *,
    min_agreement: float,
    calibration_video: Path | None = None,
) -> PreparedModel:
    """The model of ``spec``, exported now unless the cache already holds it.

    With INT8 below ``min_agreement`` (or failing to export) the FP32 model is returned, with a note.
    Raises ModelUnavailable when the backend cannot run here, and whatever the exporter raises.
    """
    if spec.backend is Backend.TORCH:
        return PreparedModel(spec.weights, Backend.TORCH, Precision.FP32)
    if spec.backend is Backend.TENSORRT:
        _require_tensorrt()
    if spec.precision is Precision.INT8:
        return _prepare_int8(spec, cache_dir, min_agreement, calibration_video)
    path, made = _cached_export(spec, cache_dir)
    return PreparedModel(path, spec.backend, spec.precision, exported_now=made)


def entry_name(backend: Backend, imgsz: int, precision: Precision) -> str:
    """The cache entry of an export. ONNX is exported with a dynamic batch (the shared engine runs
    batches of streams' frames: workers/ml/engine_process.py), so its entries say so."""
    suffix = "-dynamic" if backend is Backend.ONNX else ""
    return f"{backend.value}-{imgsz}-{precision.value}{suffix}"


def is_cached(weights: Path, backend: Backend, imgsz: int, precision: Precision, cache_dir: Path) -> bool:
    """Whether the cache already holds this export (a complete entry: made or refused, see above)."""
    return (cache_dir / weights_digest(weights) / entry_name(backend, imgsz, precision) / MANIFEST).is_file()


def _prepare_int8(
    spec: ModelSpec, cache_dir: Path, min_agreement: float, calibration_video: Path | None
) -> PreparedModel:
    fp32_spec = ModelSpec(spec.weights, spec.backend, spec.imgsz, Precision.FP32, spec.names)
    fp32_path, fp32_made = _cached_export(fp32_spec, cache_dir)

    def check(int8_path: Path) -> dict[str, Any]:
        clip = clip_frames(calibration_video)
        checked = [frame for i, frame in enumerate(clip) if i % CALIBRATION_STEP == CALIBRATION_STEP // 2]
        agreement = box_agreement(fp32_path, int8_path, checked[:MAX_CHECK_FRAMES], spec.imgsz)
        return {"agreement": round(agreement, 4), "agreement_frames": len(checked[:MAX_CHECK_FRAMES])}

    try:
        int8_path, made = _cached_export(spec, cache_dir, calibration_video=calibration_video, check=check)
    except Exception as err:  # an INT8 export that cannot be made must not stop the stream
        log.exception("INT8 export failed, running FP32", extra={"backend": spec.backend.value})
        return PreparedModel(fp32_path, spec.backend, Precision.FP32, fp32_made, f"int8 export failed: {err}")
    agreement = float(read_manifest(int8_path)["agreement"])  # measured once, judged at every start
    if agreement < min_agreement:
        note = f"int8 refused: its boxes agree {agreement:.2f} with fp32's, below {min_agreement:.2f}"
        log.warning(
            "INT8 refused, running FP32", extra={"agreement": agreement, "backend": spec.backend.value}
        )
        return PreparedModel(fp32_path, spec.backend, Precision.FP32, fp32_made, note)
    return PreparedModel(int8_path, spec.backend, Precision.INT8, made, f"int8 agreement {agreement:.2f}")


def read_manifest(model_path: Path) -> dict[str, Any]:
    """The ``lookout.json`` of the cache entry that holds ``model_path``."""
    entry = model_path if (model_path / MANIFEST).is_file() else model_path.parent
    data: dict[str, Any] = json.loads((entry / MANIFEST).read_text())
    return data


# --- the cache ---------------------------------------------------------------------------------


def _cached_export(
    spec: ModelSpec,
    cache_dir: Path,
    *,
    calibration_video: Path | None = None,
    check: Any = None,
) -> tuple[Path, bool]:
    """(the exported model's path, whether it was exported now), under the entry's lock."""
    digest = weights_digest(spec.weights)
    folder = cache_dir / digest
    folder.mkdir(parents=True, exist_ok=True)
    entry = folder / spec.entry_name
    with _locked(folder / f".{spec.entry_name}.lock"):
        if (entry / MANIFEST).is_file():
            return entry / read_manifest(entry)["file"], False
        for stale in folder.glob(f".{spec.entry_name}-*"):  # left by an exporter that died: we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        started = time.perf_counter()
        log.info("exporting the model", extra={"backend": spec.backend.value, "entry": str(entry)})
        partial = Path(tempfile.mkdtemp(prefix=f".{spec.entry_name}-", dir=folder))
        try:
            exported = _export(spec, partial, calibration_video)
            manifest: dict[str, Any] = {
                "weights": str(spec.weights),
                "weights_sha256_16": digest,
                "backend": spec.backend.value,
                "format": _FORMATS[spec.backend],
                "imgsz": spec.imgsz,
                "precision": spec.precision.value,
                "file": exported.relative_to(partial).as_posix(),
                "ultralytics": importlib.metadata.version("ultralytics"),
                "runtime": _runtime_version(spec.backend),
                "exported_at": datetime.now(UTC).isoformat(),
                "export_s": round(time.perf_counter() - started, 2),
            }
            if check is not None:
                manifest.update(check(exported))
            (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            os.replace(partial, entry)  # complete or absent, never half
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        log.info(
            "model exported",
            extra={"entry": str(entry), "export_s": manifest["export_s"], **_check_fields(manifest)},
        )
        return entry / manifest["file"], True


def _check_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: manifest[k] for k in ("agreement", "agreement_frames") if k in manifest}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _exporter_output_logged() -> Iterator[None]:
    """Keep what the exporters print (torch's tracer warnings, NNCF's progress bars, OpenVINO's
    C++ messages) off this process's stdout and stderr, which carry its JSON log lines; it is
    logged as one record instead. Done on the file descriptors, so C++ output is caught too."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 1)
        os.dup2(captured.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            captured.seek(0)
            text = captured.read().decode(errors="replace").strip()
            if text:
                log.debug("exporter output", extra={"output": text[-4000:]})


def _export(spec: ModelSpec, workdir: Path, calibration_video: Path | None) -> Path:
    """Export ``spec`` with ultralytics into ``workdir``; returns the exported model's path."""
    with _exporter_output_logged():
        return _export_quietly(spec, workdir, calibration_video)


def _export_quietly(spec: ModelSpec, workdir: Path, calibration_video: Path | None) -> Path:
    from ultralytics.models import YOLO

    weights = workdir / "model.pt"  # ultralytics writes the export beside the weights
    shutil.copyfile(spec.weights, weights)
    yolo = YOLO(str(weights), task="detect")
    yolo.model.names = dict(spec.names)  # type: ignore[union-attr]  # the export's metadata carries them
    kwargs: dict[str, Any] = {"format": _FORMATS[spec.backend], "imgsz": spec.imgsz, "verbose": False}
    if spec.backend is Backend.ONNX:
        kwargs.update(simplify=True, dynamic=True)
    if spec.backend is Backend.TENSORRT:
        kwargs["device"] = 0
    if spec.precision is Precision.INT8:
        kwargs.update(int8=True, data=str(_calibration_set(workdir / "calibration", spec, calibration_video)))
    exported = Path(yolo.export(**kwargs))
    weights.unlink()
    shutil.rmtree(workdir / "calibration", ignore_errors=True)
    for leftover in workdir.glob("*.onnx"):  # TensorRT builds from an ONNX file it leaves behind
        if leftover != exported:
            leftover.unlink()
    return exported


def _runtime_version(backend: Backend) -> str | None:
    try:
        return importlib.metadata.version(_RUNTIMES[backend])
    except importlib.metadata.PackageNotFoundError:
        return None


def _require_tensorrt() -> None:
    import torch

    if not torch.cuda.is_available():
        raise ModelUnavailable("the tensorrt backend needs a CUDA GPU, and none is visible to this process")
    try:
        importlib.metadata.version("tensorrt")
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailable(
            "the tensorrt backend needs the `tensorrt` package (pip install -e '.[gpu]': tensorrt-cu12==11.4.0.106)"
        ) from None


# --- calibration and the agreement check -------------------------------------------------------


def shipped_images() -> list[Path]:
    """ultralytics' own sample images: people and a bus."""
    assets = importlib.resources.files("ultralytics") / "assets"
    return [Path(str(assets / name)) for name in ("bus.jpg", "zidane.jpg")]


def clip_frames(video: Path | None = None) -> list[np.ndarray[Any, Any]]:
    """Every frame of the demo clip (people walking, 795 frames), or none when it is not here."""
    source = video if video is not None and video.is_file() else INSTALLED_CLIP
    if not source.is_file():
        log.warning(
            "demo clip not found: calibrating on the shipped images only", extra={"clip": str(source)}
        )
        return []
    capture = cv2.VideoCapture(str(source))
    frames: list[np.ndarray[Any, Any]] = []
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                return frames
            frames.append(frame)
    finally:
        capture.release()


def _calibration_set(folder: Path, spec: ModelSpec, video: Path | None) -> Path:
    """A detection data set of shipped frames for the exporter's INT8 calibration; its yaml's path."""
    images = folder / "images"
    images.mkdir(parents=True)
    for i, frame in enumerate(clip_frames(video)):
        if i % CALIBRATION_STEP == 0:
            cv2.imwrite(str(images / f"clip-{i:04d}.jpg"), frame)
    for path in shipped_images():
        shutil.copyfile(path, images / path.name)
    data = folder / "data.yaml"
    data.write_text(
        yaml.safe_dump({"path": str(folder), "train": "images", "val": "images", "names": dict(spec.names)})
    )
    return data


def box_agreement(reference: Path, candidate: Path, frames: list[np.ndarray[Any, Any]], imgsz: int) -> float:
    """How well ``candidate``'s boxes agree with ``reference``'s on ``frames``: 2·matched / (both
    counts), a match being the same class at IoU >= 0.5 (F1 with the reference as the truth)."""
    from ultralytics.models import YOLO

    frames = frames or [cast(np.ndarray[Any, Any], cv2.imread(str(path))) for path in shipped_images()]
    models = [YOLO(str(path), task="detect") for path in (reference, candidate)]
    matched = total = 0
    for frame in frames:
        found = []
        for model in models:
            results: Any = model.predict(frame, imgsz=imgsz, conf=0.25, verbose=False)
            boxes = results[0].boxes
            found.append((boxes.xyxy.cpu().numpy(), boxes.cls.cpu().numpy().astype(int)))
        (ref_xyxy, ref_cls), (cand_xyxy, cand_cls) = found
        total += len(ref_cls) + len(cand_cls)
        matched += _matches(ref_xyxy, ref_cls, cand_xyxy, cand_cls)
    return 1.0 if total == 0 else 2 * matched / total


def _matches(
    a_xyxy: np.ndarray[Any, Any],
    a_cls: np.ndarray[Any, Any],
    b_xyxy: np.ndarray[Any, Any],
    b_cls: np.ndarray[Any, Any],
) -> int:
    """Greedy one-to-one matches of the same class at IoU >= AGREEMENT_IOU, best pairs first."""
    if len(a_cls) == 0 or len(b_cls) == 0:
        return 0
    iou = _iou(a_xyxy, b_xyxy)
    iou[a_cls[:, None] != b_cls[None, :]] = 0.0
    count = 0
    while True:
        i, j = np.unravel_index(int(np.argmax(iou)), iou.shape)
        if iou[i, j] < AGREEMENT_IOU:
            return count
        count += 1
        iou[i, :] = 0.0
        iou[:, j] = 0.0


def _iou(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    result: np.ndarray[Any, Any] = np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)
    return result
