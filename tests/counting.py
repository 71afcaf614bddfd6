"""Counting against known truth: a simulated detector over a scene and the score of what was counted.

``SimulatedDetector`` reports each walker of a ``deploy.camera.scenes.Scene`` the way a detector
would (jitter, confidence give or take, misses, occlusion, false detections), so the tracker and the
analytics can be run offline at any frame rate; ``count_offline`` does that and ``score`` compares
the events counted with the scene's true ones, walker by walker.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Protocol

import numpy as np
from ultralytics.trackers.byte_tracker import BYTETracker

from core.analytics import AnalyticsKind, Direction
from core.detections import Box, DetectedObject
from deploy.camera.scenes import PERSON, Scene, TrueEvent
from workers.ml.analytics import ZoneAnalytics
from workers.ml.tracking import MotionTracker, TrackingResult


@dataclass
class SimulatedDetector:
    """What a detector reports of a scene: each walker's box with jitter, its confidence give or
    take, a miss now and then, an occluded walker (mostly behind another) missed, and a few
    low-confidence false detections. Seeded: the same scene gives the same detections."""

    seed: int = 0
    jitter: float = 0.03  # of the box's size, standard deviation
    confidence_noise: float = 0.04
    miss_rate: float = 0.03
    occlusion_iou: float = 0.5
    false_per_frame: float = 0.05
    _random: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def detect(self, scene: Scene, t: float) -> tuple[list[DetectedObject], list[str | None]]:
        """The detections at ``t`` and, for each, the walker it shows (None: a false detection)."""
        r = self._random
        seen = scene.boxes(t)
        hidden = {
            back.name
            for back, back_box in seen
            for front, front_box in seen
            if front is not back
            and front_box.y2 > back_box.y2
            and _iou(front_box, back_box) > self.occlusion_iou
        }
        objects: list[DetectedObject] = []
        owners: list[str | None] = []
        for walker, box in seen:
            if walker.name in hidden or r.random() < self.miss_rate:
                continue
            size = math.sqrt(walker.w * walker.h)
            dx, dy = r.gauss(0, self.jitter * size), r.gauss(0, self.jitter * size)
            dw, dh = r.gauss(0, self.jitter * walker.w), r.gauss(0, self.jitter * walker.h)
            noisy = Box(
                x1=box.x1 + dx - dw / 2,
                y1=box.y1 + dy - dh / 2,
                x2=box.x2 + dx + dw / 2,
                y2=box.y2 + dy + dh / 2,
            )
            confidence = min(0.99, max(0.26, walker.confidence + r.gauss(0, self.confidence_noise)))
            objects.append(
                DetectedObject(
                    class_name=walker.class_name, class_id=walker.class_id, confidence=confidence, box=noisy
                )
            )
            owners.append(walker.name)
        if r.random() < self.false_per_frame:
            x, y = r.uniform(0, scene.width - 40), r.uniform(0, scene.height - 90)
            objects.append(
                DetectedObject(
                    class_name="person", class_id=PERSON, confidence=r.uniform(0.26, 0.45),
                    box=Box(x1=x, y1=y, x2=x + 40, y2=y + 90),
                )
            )  # fmt: skip
            owners.append(None)
        return objects, owners


def _iou(a: Box, b: Box) -> float:
    iw = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    ih = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = iw * ih
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class CountScore:
    """Counted events against the true ones, per kind: found, missed, extra; and identity switches."""

    true: Counter[str] = field(default_factory=Counter)
    found: Counter[str] = field(default_factory=Counter)
    missed: Counter[str] = field(default_factory=Counter)
    extra: Counter[str] = field(default_factory=Counter)
    id_switches: int = 0

    def add(self, other: CountScore) -> None:
        for mine, theirs in (
            (self.true, other.true),
            (self.found, other.found),
            (self.missed, other.missed),
            (self.extra, other.extra),
        ):
            mine.update(theirs)
        self.id_switches += other.id_switches


def score(
    true: list[TrueEvent],
    counted: list[tuple[AnalyticsKind, str, int, Direction | None]],
    track_owner: dict[int, str | None],
    walker_tracks: dict[str, set[int]],
) -> CountScore:
    """Compare per walker and event (kind, shape, direction): a counted event belongs to the walker
    whose detections made its track."""
    result = CountScore()

    def key(kind: AnalyticsKind, shape: str, direction: Direction | None) -> str:
        return f"{kind.value}:{shape}" + (f":{direction.value}" if direction else "")

    wanted: Counter[tuple[str | None, str]] = Counter(
        (e.walker, key(e.kind, e.shape, e.direction)) for e in true
    )
    got: Counter[tuple[str | None, str]] = Counter(
        (track_owner.get(track_id), key(kind, shape, direction))
        for kind, shape, track_id, direction in counted
    )
    for walker, k in wanted.keys() | got.keys():
        kind = k.split(":", 1)[0]
        want, have = wanted[(walker, k)], got[(walker, k)]
        result.true[kind] += want
        result.found[kind] += min(want, have)
        result.missed[kind] += max(0, want - have)
        result.extra[kind] += max(0, have - want)
    result.id_switches = sum(max(0, len(tracks) - 1) for tracks in walker_tracks.values())
    return result


class Tracker(Protocol):
    def update(
        self, objects: list[DetectedObject], now: float, frame: tuple[int, int] | None = None
    ) -> TrackingResult: ...


# ultralytics' cfg/trackers/bytetrack.yaml, with the buffer counted in frames of the stream
BYTETRACK = {
    "tracker_type": "bytetrack",
    "track_high_thresh": 0.25,
    "track_low_thresh": 0.1,
    "new_track_thresh": 0.25,
    "match_thresh": 0.8,
    "fuse_score": True,
}


class _Boxes:
    """What BYTETracker reads of a frame's detections: ``conf``, ``cls``, ``xywh``, boolean indexing."""

    def __init__(self, xyxy: np.ndarray, conf: np.ndarray, cls: np.ndarray) -> None:
        self.xyxy, self.conf, self.cls = xyxy, conf, cls

    @property
    def xywh(self) -> np.ndarray:
        x1, y1, x2, y2 = self.xyxy.T
        return np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=1)

    def __len__(self) -> int:
        return len(self.conf)

    def __getitem__(self, index: np.ndarray) -> _Boxes:
        return _Boxes(self.xyxy[index], self.conf[index], self.cls[index])


class ByteTrackBaseline:
    """ultralytics' ByteTrack as Lookout ran it before its own tracker (the benchmark's baseline);
    ``track_buffer`` frames keep a lost track alive."""

    def __init__(self, track_buffer: int = 30) -> None:
        self._tracker = BYTETracker(SimpleNamespace(**BYTETRACK, track_buffer=track_buffer))  # type: ignore[no-untyped-call]

    def update(
        self, objects: list[DetectedObject], now: float, frame: tuple[int, int] | None = None
    ) -> TrackingResult:
        """The objects seen in this frame with their ``track_id`` (those not yet tracked keep None)."""
        if not objects:
            self._tracker.update(_Boxes(np.zeros((0, 4)), np.zeros(0), np.zeros(0)))
            return TrackingResult(objects)
        boxes = _Boxes(
            np.array([[o.box.x1, o.box.y1, o.box.x2, o.box.y2] for o in objects], dtype=np.float32),
            np.array([o.confidence for o in objects], dtype=np.float32),
            np.array([o.class_id for o in objects], dtype=np.float32),
        )
        tracked = self._tracker.update(boxes)  # rows [x1, y1, x2, y2, track_id, score, cls, idx]
        ids: dict[int, int] = {int(row[7]): int(row[4]) for row in tracked}
        return TrackingResult([o.model_copy(update={"track_id": ids.get(i)}) for i, o in enumerate(objects)])

    @property
    def size(self) -> int:
        """Tracks held (tracked, lost and the bounded list of removed ones)."""
        t = self._tracker
        return len(t.tracked_stracks) + len(t.lost_stracks) + len(t.removed_stracks)


def motion_tracker(fps: float) -> Tracker:
    """Lookout's tracker (workers/ml/tracking.py) with its defaults."""
    return MotionTracker()


def bytetrack(fps: float) -> Tracker:
    """The ByteTrack baseline with Lookout's former buffer (3 s of frames)."""
    return ByteTrackBaseline(max(1, round(3.0 * fps)))


def count_offline(
    scene: Scene, fps: float, make_tracker: Callable[[float], Tracker] = motion_tracker, seed: int = 0
) -> CountScore:
    """Play ``scene`` at ``fps`` through the simulated detector, a tracker and the analytics; score it."""
    detector = SimulatedDetector(seed=seed)
    tracker = make_tracker(fps)
    analytics = ZoneAnalytics(scene.zones, scene.lines, lost_after_s=2.0)
    counted: list[tuple[AnalyticsKind, str, int, Direction | None]] = []
    votes: dict[int, Counter[str | None]] = {}
    walker_tracks: dict[str, set[int]] = {w.name: set() for w in scene.walkers}
    frames = int((scene.duration_s + 3.0) * fps)  # 3 s more: the last tracks are lost and leave
    for frame in range(frames):
        t = frame / fps
        objects, owners = detector.detect(scene, t)
        result = tracker.update(objects, t, (scene.width, scene.height))
        for obj, owner in zip(result.objects, owners, strict=True):
            if obj.track_id is not None:
                votes.setdefault(obj.track_id, Counter())[owner] += 1
                if owner is not None:
                    walker_tracks[owner].add(obj.track_id)
        events = analytics.update(result.objects, scene.width, scene.height, t, seeds=result.seeds)
        counted += [(e.kind, e.zone, e.track_id, e.direction) for e in events]
    track_owner = {track_id: ballot.most_common(1)[0][0] for track_id, ballot in votes.items()}
    return score(scene.true_events(), counted, track_owner, walker_tracks)
