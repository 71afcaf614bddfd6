"""Analytics benchmark (not a test): what tracking, a line and a zone cost per frame, per backend.

On the demo clip (people walking, 768x576; every 2nd frame, as a 5 fps stream of the 10 fps clip)
each backend detects every frame once; the same detections then go through the tracker (workers/ml/tracking.py)
and the zone/line analytics. Printed side by side per backend: the model's ms/frame (predict with
pre- and post-processing), tracking + events ms/frame, the fps of one stream's detection alone and
with tracking, the overhead, the events found, and the
tracker's memory (tracks held) after the clip played 10 times in a row.

    .venv/bin/python benchmarks/analytics_bench.py [--imgsz 640] [--backends torch openvino onnx]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import cv2  # noqa: E402

from core.analytics import Line, Zone  # noqa: E402
from core.inference import Backend  # noqa: E402
from deploy.camera.clip import ensure_clip  # noqa: E402
from workers.ml.analytics import ZoneAnalytics  # noqa: E402
from workers.ml.detector import DetectionOptions, load_detector  # noqa: E402
from workers.ml.tracking import MotionTracker  # noqa: E402

DOOR = Line(name="door", points=((0.5, 0.05), (0.5, 0.95)))
LEFT_SIDE = Zone(name="left side", points=[(0.0, 0.3), (0.4, 0.3), (0.4, 1.0), (0.0, 1.0)], dwell_s=3.0)
FPS = 5.0


def clip_frames() -> list:  # type: ignore[type-arg]
    capture = cv2.VideoCapture(str(ensure_clip()))
    frames = []
    index = 0
    while True:
        ok, image = capture.read()
        if not ok:
            break
        if index % 2 == 0:
            frames.append(image)
        index += 1
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--backends", nargs="+", default=["torch", "openvino", "onnx"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / ".lookout" / "models")
    args = parser.parse_args()
    frames = clip_frames()
    height, width = frames[0].shape[:2]
    options = DetectionOptions(imgsz=args.imgsz, confidence=0.25)
    rows = []
    for name in args.backends:
        detector = load_detector(
            backend=Backend(name), imgsz=args.imgsz, cache_dir=args.models_dir, threads=args.threads
        )
        started = time.perf_counter()
        detections = [detector.detect(image, options) for image in frames]
        model_s = time.perf_counter() - started
        tracker = MotionTracker()
        analytics = ZoneAnalytics([LEFT_SIDE], [DOOR])
        events: Counter[str] = Counter()
        started = time.perf_counter()
        for i, objects in enumerate(detections):
            tracked = tracker.update(objects, i / FPS, (width, height))
            for event in analytics.update(tracked.objects, width, height, i / FPS, seeds=tracked.seeds):
                events[f"{event.kind.value}{'-' + event.direction.value if event.direction else ''}"] += 1
        tracking_s = time.perf_counter() - started
        for loop in range(1, 10):  # a long stream: the clip again and again
            for i, objects in enumerate(detections):
                now = (loop * len(detections) + i) / FPS
                tracked = tracker.update(objects, now, (width, height))
                analytics.update(tracked.objects, width, height, now, seeds=tracked.seeds)
        rows.append((detector.label, model_s, tracking_s, events, tracker.size))
    n = len(frames)
    lines = [
        f"\nLookout analytics benchmark, {time.strftime('%Y-%m-%d')}: yolov10n · imgsz {args.imgsz} · "
        f"{os.cpu_count()} CPU cores · {args.threads} threads · {n} frames of the demo clip (5 fps of its 10)"
    ]
    header = (
        f"{'backend':16} {'model ms':>9} {'track+events ms':>16} {'fps detect':>11} {'fps +track':>11}"
        f" {'overhead':>9}  events (one pass)  tracks held after 10 passes"
    )
    lines += [header, "-" * len(header)]
    for label, model_s, tracking_s, events, size in rows:
        listed = ", ".join(f"{k} {v}" for k, v in sorted(events.items()))
        lines.append(
            f"{label:16} {1000 * model_s / n:9.2f} {1000 * tracking_s / n:16.3f} {n / model_s:11.2f}"
            f" {n / (model_s + tracking_s):11.2f} {100 * tracking_s / model_s:8.1f}%  {listed}  {size}"
        )
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
