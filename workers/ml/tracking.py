"""Tracking that holds from 2 to 30 fps: association gated by how far an object can move in the time
between two frames, not by how much its boxes overlap.

ByteTrack (ultralytics') matches a detection to a track by IoU and confirms a new track only when it
matches again in the next frame at a fixed IoU gate. At 2-5 fps a walker moves most of its own width
between frames, the IoU of its two boxes is low or zero, its track is never confirmed, and nothing
it does is counted (measured: 10 of 25 line crossings at 5 fps, 25 of 25 at 10 fps).

Here every track predicts where it is now from its velocity and the time since it was last seen
(capture times, not frame counts, so a stream's rate and its gaps are both accounted for), and a
detection may join it when it lies within a gate that grows with that time: for a track whose
velocity is known, a small slack around the prediction; for a new track, as far as an object can
move (``max_speed`` of its own sizes per second). The cost mixes the distance to the prediction
(as a fraction of the gate) with the overlap of the predicted box, so at high frame rates it is
ByteTrack's IoU matching and at low ones a motion gate. Detections are matched in two rounds, the
confident ones first (ByteTrack's idea), each class with its own tracks; an optimal assignment
(``lap``) solves each round.

A new track is tentative until it is matched ``confirm_hits`` times over at least ``confirm_s`` (one
not matched in the next frame was a false detection and goes); only confirmed tracks carry a
``track_id`` on the objects stored and drawn, but the position where a track was first seen is
handed back when it is confirmed, so that a crossing between its first two frames still counts.
A track unseen for ``buffer_s`` is dropped, and sooner when its prediction walks out of the frame
(it left: a newcomer at the same edge is someone else). Ids start at ``first_id`` and only grow, so a restarted
detection process can go on from the last id its stream used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import lap  # type: ignore[import-untyped]
import numpy as np

from core.detections import Box, DetectedObject

INFEASIBLE = 1e6


@dataclass(frozen=True)
class TrackerConfig:
    """How far a track may reach, how sure a new one must be, how long a lost one is kept."""

    high_confidence: float = 0.5  # detections at least this sure are matched first
    new_track_confidence: float = 0.3  # an unmatched detection this sure starts a (tentative) track
    confirm_hits: int = 2  # matches that make a tentative track a confirmed one
    confirm_s: float = 0.15  # ... spanning at least this long (5 frames at 30 fps, 2 at 10 fps)
    buffer_s: float = 3.0  # a track unseen this long is dropped
    # a tentative track not matched in the next frame was a false detection: dropped (ByteTrack does
    # the same); a frame later than this is not "the next" either way
    tentative_s: float = 1.0
    max_speed: float = 3.0  # sizes (sqrt(w*h)) per second: how far a track without a velocity may reach
    speed_slack: float = 2.0  # sizes per second around the prediction of a track with a velocity
    base_gate: float = 0.5  # sizes: the gate of a track seen a moment ago
    max_size_change: float = 0.7  # |log(w ratio)| + |log(h ratio)| beyond this is another object
    # the cost a match may have (a mix of distance and overlap, 0..1): a less sure detection (second
    # round) joining a track that missed the last frame must lie closer (a false detection near a
    # track whose object was hidden a moment must not take it over)
    cost_limit: float = 1.0
    weak_cost_limit: float = 0.5
    velocity_window_s: float = 0.5  # the velocity is averaged over about this long


@dataclass
class _Track:
    track_id: int
    class_id: int
    cx: float
    cy: float
    w: float
    h: float
    seen_at: float
    first: Box
    first_at: float
    vx: float | None = None  # pixels per second, once measured
    vy: float | None = None
    hits: int = 1
    confirmed: bool = False

    @property
    def size(self) -> float:
        return math.sqrt(max(self.w, 1.0) * max(self.h, 1.0))

    def predicted(self, now: float) -> tuple[float, float]:
        dt = max(0.0, now - self.seen_at)
        return self.cx + (self.vx or 0.0) * dt, self.cy + (self.vy or 0.0) * dt

    def gate(self, now: float, config: TrackerConfig) -> float:
        """Pixels a detection may lie from the prediction."""
        dt = max(0.0, now - self.seen_at)
        speed = config.speed_slack if self.vx is not None else config.max_speed
        return self.size * (config.base_gate + speed * dt)


@dataclass(frozen=True)
class Seed:
    """Where a track confirmed in this frame was first seen (its tentative start)."""

    box: Box
    at: float


@dataclass
class TrackingResult:
    """One frame's objects (``track_id`` set on confirmed tracks), what was newly confirmed, and the
    detections that joined no track."""

    objects: list[DetectedObject]
    seeds: dict[int, Seed] = field(default_factory=dict)
    unmatched: int = 0


def _inside(track: _Track, now: float, frame: tuple[int, int]) -> bool:
    """Whether the track's predicted centre is still within the frame (give or take half its box)."""
    x, y = track.predicted(now)
    return -track.w / 2 <= x <= frame[0] + track.w / 2 and -track.h / 2 <= y <= frame[1] + track.h / 2


def _xywh(box: Box) -> tuple[float, float, float, float]:
    return (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2, box.x2 - box.x1, box.y2 - box.y1


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0.0, min(ax + aw / 2, bx + bw / 2) - max(ax - aw / 2, bx - bw / 2))
    ih = max(0.0, min(ay + ah / 2, by + bh / 2) - max(ay - ah / 2, by - bh / 2))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


class MotionTracker:
    """Tracks one stream's objects across frames; ``update`` once per frame with its capture time."""

    def __init__(self, config: TrackerConfig | None = None, *, first_id: int = 1) -> None:
        self.config = config or TrackerConfig()
        self._tracks: list[_Track] = []
        self._next_id = first_id
        self._last_frame_at: float | None = None

    @property
    def size(self) -> int:
        """Tracks held (confirmed and tentative)."""
        return len(self._tracks)

    @property
    def next_id(self) -> int:
        """The id the next new track gets."""
        return self._next_id

    def update(
        self, objects: list[DetectedObject], now: float, frame: tuple[int, int] | None = None
    ) -> TrackingResult:
        """Match this frame's ``objects`` (captured at ``now``, seconds) to the tracks; ``frame``
        (width, height): a lost track whose prediction has walked out of it has left."""
        config = self.config
        previous_frame_at = self._last_frame_at
        # a tentative track seen before the previous frame missed its next frame
        tentative_from = now - config.tentative_s if previous_frame_at is None else previous_frame_at
        tentative_from = max(tentative_from, now - config.tentative_s)
        self._last_frame_at = now
        self._tracks = [
            t
            for t in self._tracks
            if (now - t.seen_at <= config.buffer_s if t.confirmed else t.seen_at >= tentative_from)
            and (frame is None or _inside(t, now, frame))
        ]
        owner: dict[int, _Track] = {}
        free_tracks = list(self._tracks)
        for confident in (True, False):
            round_ = [
                i
                for i, o in enumerate(objects)
                if i not in owner and (o.confidence >= config.high_confidence) == confident
            ]
            for i, matched in self._assign(objects, round_, free_tracks, now, confident, previous_frame_at):
                owner[i] = matched
                free_tracks.remove(matched)
        result = TrackingResult(objects=[])
        for i, obj in enumerate(objects):
            track: _Track | None = owner.get(i)
            if track is not None:
                was_confirmed = track.confirmed
                self._follow(track, obj, now)
                if track.confirmed and not was_confirmed:
                    result.seeds[track.track_id] = Seed(track.first, track.first_at)
            elif obj.confidence >= config.new_track_confidence:
                track = self._start(obj, now)
            else:
                result.unmatched += 1
            track_id = track.track_id if track is not None and track.confirmed else None
            result.objects.append(obj.model_copy(update={"track_id": track_id}))
        return result

    def _assign(
        self,
        objects: list[DetectedObject],
        indices: list[int],
        tracks: list[_Track],
        now: float,
        confident: bool,
        previous_frame_at: float | None,
    ) -> list[tuple[int, _Track]]:
        """The cheapest one-to-one matches of ``objects[indices]`` with ``tracks`` within their gates."""
        if not indices or not tracks:
            return []
        config = self.config
        cost = np.full((len(indices), len(tracks)), INFEASIBLE)
        for r, i in enumerate(indices):
            obj = objects[i]
            box = _xywh(obj.box)
            for c, track in enumerate(tracks):
                if track.class_id != obj.class_id:
                    continue
                missed = previous_frame_at is not None and track.seen_at < previous_frame_at
                limit = config.weak_cost_limit if missed and not confident else config.cost_limit
                value = self._cost(track, box, now)
                cost[r, c] = value if value < limit else INFEASIBLE
        _total, rows, _cols = lap.lapjv(cost, extend_cost=True, cost_limit=config.cost_limit)
        return [(indices[r], tracks[c]) for r, c in enumerate(rows) if c >= 0 and cost[r, c] < INFEASIBLE]

    def _cost(self, track: _Track, box: tuple[float, float, float, float], now: float) -> float:
        config = self.config
        x, y, w, h = box
        if abs(math.log(max(w, 1.0) / max(track.w, 1.0))) + abs(math.log(max(h, 1.0) / max(track.h, 1.0))) > (
            config.max_size_change
        ):
            return INFEASIBLE
        px, py = track.predicted(now)
        distance = math.hypot(x - px, y - py) / track.gate(now, config)
        if distance >= 1.0:
            return INFEASIBLE
        overlap = _iou((px, py, track.w, track.h), box)
        return 0.5 * distance + 0.5 * (1.0 - overlap)

    def _start(self, obj: DetectedObject, now: float) -> _Track:
        x, y, w, h = _xywh(obj.box)
        track = _Track(self._next_id, obj.class_id, x, y, w, h, now, obj.box, now)
        track.confirmed = self.config.confirm_hits <= 1
        self._next_id += 1
        self._tracks.append(track)
        return track

    def _follow(self, track: _Track, obj: DetectedObject, now: float) -> None:
        x, y, w, h = _xywh(obj.box)
        dt = now - track.seen_at
        if dt > 0:
            vx, vy = (x - track.cx) / dt, (y - track.cy) / dt
            if track.vx is None or track.vy is None:
                track.vx, track.vy = vx, vy
            else:
                # a newer measurement weighs by the time it covers: jitter over 1/30 s is no speed
                a = min(1.0, dt / self.config.velocity_window_s)
                track.vx, track.vy = a * vx + (1 - a) * track.vx, a * vy + (1 - a) * track.vy
        track.cx, track.cy, track.w, track.h, track.seen_at = x, y, w, h, now
        track.hits += 1
        if track.hits >= self.config.confirm_hits and now - track.first_at >= self.config.confirm_s:
            track.confirmed = True
