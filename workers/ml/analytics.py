"""The events a stream's tracks make in zones and on lines (in the detection process).

``ZoneAnalytics`` follows each confirmed track's position (the bottom centre of its box; tracks
come from workers/ml/tracking.py) and yields ``entered``/``left``/``dwell``/``crossed`` events; a
track not seen for ``lost_after_s`` has left every zone it was in. Memory is bounded: a track
forgotten here is forgotten for good.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from core.analytics import (
    AnalyticsKind,
    Direction,
    EventCause,
    Line,
    Point,
    Zone,
    cross,
    distance_to_border,
    point_in_polygon,
    segments_intersect,
)
from core.detections import DetectedObject
from workers.ml.tracking import Seed


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
    cause: EventCause | None = None


@dataclass
class _Track:
    position: Point  # pixels
    seen_at: float
    class_name: str
    confidence: float
    margin: float = 0.0  # pixels: how far past a border its position must be to count as past it
    inside: dict[str, float] = field(default_factory=dict)  # zone name → since when
    sides: dict[str, tuple[bool, Point]] = field(default_factory=dict)  # line → (on its right, where decided)
    dwelt: set[str] = field(default_factory=set)  # zones whose dwell event was sent this visit


class ZoneAnalytics:
    """Turns tracked objects into zone and line events, and keeps occupancy and line counts.

    A box jitters by a few pixels from frame to frame, so at high frame rates an object standing on
    a line or a zone's border would cross it back and forth. A side, or being in or out of a zone,
    changes only when the object's position is past the border by ``hysteresis`` of its own size
    (sqrt of its box's area); within that band the last decided side holds.
    """

    def __init__(
        self, zones: list[Zone], lines: list[Line], *, lost_after_s: float = 2.0, hysteresis: float = 0.15
    ) -> None:
        self.zones = zones
        self.lines = lines
        self.lost_after_s = lost_after_s
        self.hysteresis = hysteresis
        self._tracks: dict[int, _Track] = {}
        self.line_counts: dict[str, dict[Direction, int]] = {
            ln.name: dict.fromkeys(Direction, 0) for ln in lines
        }
        self._size = (1, 1)

    def close_visits(self, visits: list[tuple[str, int, str, float]], now: float) -> list[TrackEvent]:
        """``left`` (cause: restart) for the (zone, track id, class, entered at) visits an earlier
        detection process of the stream left open: its tracks died with it, and a new track is a new
        visit, so occupancy is true again and the restart shows in the events."""
        return [
            TrackEvent(
                AnalyticsKind.LEFT,
                zone,
                track_id,
                class_name,
                0.0,
                dwell_s=max(0.0, now - entered_at),
                cause=EventCause.RESTART,
            )
            for zone, track_id, class_name, entered_at in visits
            if any(z.name == zone for z in self.zones)
        ]

    def zones_of(self) -> dict[int, frozenset[str]]:
        """The zones each track stands in now."""
        return {track_id: frozenset(track.inside) for track_id, track in self._tracks.items()}

    def occupancy(self) -> dict[str, int]:
        """Tracks standing in each zone now."""
        counts = {z.name: 0 for z in self.zones}
        for track in self._tracks.values():
            for name in track.inside:
                counts[name] += 1
        return counts

    def update(
        self,
        objects: list[DetectedObject],
        width: int,
        height: int,
        now: float,
        seeds: Mapping[int, Seed] | None = None,
    ) -> list[TrackEvent]:
        """The events of one frame (captured at ``now``, seconds) from its tracked objects.

        ``seeds``: where tracks confirmed in this frame were first seen; a new track starts there,
        so what it did between its first frames (a crossing, a zone passed through) counts."""
        self._size = (width, height)
        events: list[TrackEvent] = []
        seen: set[int] = set()
        for obj in objects:
            if obj.track_id is None:
                continue
            seen.add(obj.track_id)
            position = ((obj.box.x1 + obj.box.x2) / 2, obj.box.y2)
            margin = self.hysteresis * math.sqrt(
                max(obj.box.x2 - obj.box.x1, 1.0) * max(obj.box.y2 - obj.box.y1, 1.0)
            )
            track = self._tracks.get(obj.track_id)
            seed = (seeds or {}).get(obj.track_id)
            if track is None and seed is not None:
                # the frames of its tentative start count too: where it was first seen, first
                start = ((seed.box.x1 + seed.box.x2) / 2, seed.box.y2)
                track = self._tracks[obj.track_id] = _Track(
                    start, seed.at, obj.class_name, obj.confidence, margin
                )
                events += self._lines_crossed(obj.track_id, track, start)
                events += self._zones_changed(obj.track_id, track, start, seed.at)
            if track is None:
                track = self._tracks[obj.track_id] = _Track(
                    position, now, obj.class_name, obj.confidence, margin
                )
            track.position, track.seen_at, track.confidence, track.margin = (
                position,
                now,
                obj.confidence,
                margin,
            )
            events += self._lines_crossed(obj.track_id, track, position)
            events += self._zones_changed(obj.track_id, track, position, now)
        for track_id in [
            t
            for t, track in self._tracks.items()
            if t not in seen and now - track.seen_at > self.lost_after_s
        ]:
            track = self._tracks.pop(track_id)
            events += [self._left(track_id, track, name, now) for name in list(track.inside)]
        return events

    def _pixels(self, points: list[Point]) -> list[Point]:
        width, height = self._size
        return [(x * width, y * height) for x, y in points]

    def _watches(self, classes: list[str] | None, class_name: str) -> bool:
        return classes is None or class_name in classes

    def _lines_crossed(self, track_id: int, track: _Track, position: Point) -> list[TrackEvent]:
        events = []
        for line in self.lines:
            if not self._watches(line.classes, track.class_name):
                continue
            a, b = self._pixels(list(line.points))
            length = math.dist(a, b)
            distance = cross(a, b, position) / length if length else 0.0
            if abs(distance) < track.margin:
                continue  # on the line, give or take: its side is decided when it is past it
            right = distance > 0
            decided = track.sides.get(line.name)
            track.sides[line.name] = (right, position)
            # a crossing: past the line on the other side than last decided, over the segment itself
            if decided is None or decided[0] == right or not segments_intersect(a, b, decided[1], position):
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
            polygon = self._pixels(list(zone.points))
            if distance_to_border(position, polygon) < track.margin:
                inside = zone.name in track.inside  # on the border, give or take: as it was
            else:
                inside = point_in_polygon(position, polygon)
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
