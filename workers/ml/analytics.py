"""A stream's tracker and the events its tracks make in zones and on lines (in the detection process).

``ObjectTracker`` gives each detection a track id (ultralytics' ByteTrack, the same on every
backend: it works on boxes, not on the model). ``ZoneAnalytics`` follows each track's position (the
bottom centre of its box) and yields ``entered``/``left``/``dwell``/``crossed`` events; a track
not seen for ``lost_after_s`` has left every zone it was in. Memory is bounded: ByteTrack drops
lost tracks after its buffer, and a track forgotten here is forgotten for good.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
from ultralytics.trackers.byte_tracker import BYTETracker

from core.analytics import (
    AnalyticsKind,
    Direction,
    Line,
    Point,
    Zone,
    cross,
    point_in_polygon,
    segments_intersect,
)
from core.detections import DetectedObject

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


class ObjectTracker:
    """ByteTrack over a stream's detections; ``track_buffer`` frames keep a lost track alive."""

    def __init__(self, track_buffer: int = 30) -> None:
        self._tracker = BYTETracker(SimpleNamespace(**BYTETRACK, track_buffer=track_buffer))  # type: ignore[no-untyped-call]

    def update(self, objects: list[DetectedObject]) -> list[DetectedObject]:
        """The objects seen in this frame with their ``track_id`` (those not yet tracked keep None)."""
        if not objects:
            self._tracker.update(_Boxes(np.zeros((0, 4)), np.zeros(0), np.zeros(0)))
            return objects
        boxes = _Boxes(
            np.array([[o.box.x1, o.box.y1, o.box.x2, o.box.y2] for o in objects], dtype=np.float32),
            np.array([o.confidence for o in objects], dtype=np.float32),
            np.array([o.class_id for o in objects], dtype=np.float32),
        )
        tracked = self._tracker.update(boxes)  # rows [x1, y1, x2, y2, track_id, score, cls, idx]
        ids: dict[int, int] = {int(row[7]): int(row[4]) for row in tracked}
        return [o.model_copy(update={"track_id": ids.get(i)}) for i, o in enumerate(objects)]

    @property
    def size(self) -> int:
        """Tracks held (tracked, lost and the bounded list of removed ones)."""
        t = self._tracker
        return len(t.tracked_stracks) + len(t.lost_stracks) + len(t.removed_stracks)


@dataclass(frozen=True)
class TrackEvent:
    """An event before it is stored: the store adds the stream, frame and ids."""

    kind: AnalyticsKind
    zone: str
    track_id: int
    class_name: str
    confidence: float
    direction: Direction | None = None
    dwell_s: float | None = None


@dataclass
class _Track:
    position: Point
    seen_at: float
    class_name: str
    confidence: float
    inside: dict[str, float] = field(default_factory=dict)  # zone name → since when
    sides: dict[str, bool] = field(default_factory=dict)  # line name → on its right side (last seen off it)
    dwelt: set[str] = field(default_factory=set)  # zones whose dwell event was sent this visit


def foot_point(obj: DetectedObject, width: int, height: int) -> Point:
    """Where an object stands: the bottom centre of its box, as fractions of the frame."""
    return ((obj.box.x1 + obj.box.x2) / 2 / width, obj.box.y2 / height)


class ZoneAnalytics:
    """Turns tracked objects into zone and line events, and keeps occupancy and line counts."""

    def __init__(self, zones: list[Zone], lines: list[Line], *, lost_after_s: float = 2.0) -> None:
        self.zones = zones
        self.lines = lines
        self.lost_after_s = lost_after_s
        self._tracks: dict[int, _Track] = {}
        self.line_counts: dict[str, dict[Direction, int]] = {
            ln.name: dict.fromkeys(Direction, 0) for ln in lines
        }

    def occupancy(self) -> dict[str, int]:
        """Tracks standing in each zone now."""
        counts = {z.name: 0 for z in self.zones}
        for track in self._tracks.values():
            for name in track.inside:
                counts[name] += 1
        return counts

    def update(self, objects: list[DetectedObject], width: int, height: int, now: float) -> list[TrackEvent]:
        """The events of one frame (captured at ``now``, seconds) from its tracked objects."""
        events: list[TrackEvent] = []
        seen: set[int] = set()
        for obj in objects:
            if obj.track_id is None:
                continue
            seen.add(obj.track_id)
            position = foot_point(obj, width, height)
            track = self._tracks.get(obj.track_id)
            if track is None:
                track = self._tracks[obj.track_id] = _Track(position, now, obj.class_name, obj.confidence)
                previous = None
            else:
                previous = track.position
                track.position, track.seen_at, track.confidence = position, now, obj.confidence
            events += self._lines_crossed(obj.track_id, track, previous, position)
            events += self._zones_changed(obj.track_id, track, position, now)
        for track_id in [
            t
            for t, track in self._tracks.items()
            if t not in seen and now - track.seen_at > self.lost_after_s
        ]:
            track = self._tracks.pop(track_id)
            events += [self._left(track_id, track, name, now) for name in list(track.inside)]
        return events

    def _watches(self, classes: list[str] | None, class_name: str) -> bool:
        return classes is None or class_name in classes

    def _lines_crossed(
        self, track_id: int, track: _Track, previous: Point | None, position: Point
    ) -> list[TrackEvent]:
        events = []
        for line in self.lines:
            a, b = line.points
            if not self._watches(line.classes, track.class_name):
                continue
            after = cross(a, b, position)
            if after == 0:
                continue  # on the line: its side is decided when it steps off
            was_right, right = track.sides.get(line.name), after > 0
            track.sides[line.name] = right
            # a crossing: off the line on the other side than last time, over the segment itself
            if previous is None or was_right is None or was_right == right:
                continue
            if not segments_intersect(a, b, previous, position):
                continue
            direction = Direction.IN if right else Direction.OUT
            self.line_counts[line.name][direction] += 1
            events.append(
                TrackEvent(
                    AnalyticsKind.CROSSED, line.name, track_id, track.class_name, track.confidence, direction
                )
            )
        return events

    def _zones_changed(self, track_id: int, track: _Track, position: Point, now: float) -> list[TrackEvent]:
        events = []
        for zone in self.zones:
            if not self._watches(zone.classes, track.class_name):
                continue
            inside = point_in_polygon(position, zone.points)
            if inside and zone.name not in track.inside:
                track.inside[zone.name] = now
                events.append(
                    TrackEvent(AnalyticsKind.ENTERED, zone.name, track_id, track.class_name, track.confidence)
                )
            elif not inside and zone.name in track.inside:
                events.append(self._left(track_id, track, zone.name, now))
            elif inside and zone.dwell_s is not None and zone.name not in track.dwelt:
                stayed = now - track.inside[zone.name]
                if stayed >= zone.dwell_s:
                    track.dwelt.add(zone.name)
                    events.append(
                        TrackEvent(
                            AnalyticsKind.DWELL,
                            zone.name,
                            track_id,
                            track.class_name,
                            track.confidence,
                            dwell_s=stayed,
                        )
                    )
        return events

    def _left(self, track_id: int, track: _Track, zone: str, now: float) -> TrackEvent:
        since = track.inside.pop(zone)
        track.dwelt.discard(zone)
        return TrackEvent(
            AnalyticsKind.LEFT,
            zone,
            track_id,
            track.class_name,
            track.confidence,
            dwell_s=max(0.0, now - since),
        )
