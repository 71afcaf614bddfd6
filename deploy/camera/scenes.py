"""Scenes with known ground truth: walkers on known paths and the zone and line events they make.

One description of a scene gives the test camera's walkers clip (deploy/camera/walkers.py), the
detections the counting benchmark and the tracker's tests simulate (tests/counting.py), and the
true events all of them are scored against, so a count can be checked exactly. Positions are pixels
of a ``width`` x ``height`` frame; a walker's position is the bottom centre of its box (the
analytics' foot point), its box ``w`` x ``h`` pixels above it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from core.analytics import AnalyticsKind, Direction, Line, Zone, cross, point_in_polygon
from core.detections import Box

PERSON = 0  # COCO class id


@dataclass(frozen=True)
class Walker:
    """One object walking ``path`` (pixel waypoints) at ``speed`` px/s from ``start_s``, pausing
    ``pause_s`` seconds at each waypoint after the first (a dwell), detected at ``confidence``."""

    name: str
    path: tuple[tuple[float, float], ...]
    speed: float
    start_s: float
    w: float = 50.0
    h: float = 120.0
    confidence: float = 0.8
    pause_s: tuple[float, ...] = ()
    class_id: int = PERSON
    class_name: str = "person"

    def _legs(self) -> list[tuple[float, float, tuple[float, float], tuple[float, float]]]:
        """(start time, end time, from, to) of each move and pause."""
        legs = []
        t = self.start_s
        for i, (a, b) in enumerate(zip(self.path, self.path[1:], strict=False)):
            duration = math.dist(a, b) / self.speed
            legs.append((t, t + duration, a, b))
            t += duration
            pause = self.pause_s[i] if i < len(self.pause_s) else 0.0
            if pause > 0:
                legs.append((t, t + pause, b, b))
                t += pause
        return legs

    @property
    def end_s(self) -> float:
        legs = self._legs()
        return legs[-1][1] if legs else self.start_s

    def position(self, t: float) -> tuple[float, float] | None:
        """Where it stands at ``t`` (None before it starts or after it ends)."""
        for start, end, a, b in self._legs():
            if start <= t <= end:
                f = 0.0 if end == start else (t - start) / (end - start)
                return a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f
        return None

    def box(self, t: float) -> Box | None:
        at = self.position(t)
        if at is None:
            return None
        x, y = at
        return Box(x1=x - self.w / 2, y1=y - self.h, x2=x + self.w / 2, y2=y)


@dataclass(frozen=True)
class TrueEvent:
    """An event the scene makes: who, what, where, when."""

    walker: str
    kind: AnalyticsKind
    shape: str
    at: float
    direction: Direction | None = None


@dataclass
class Scene:
    """Walkers in a frame, with the zones and lines that count them."""

    name: str
    width: int
    height: int
    walkers: list[Walker]
    zones: list[Zone] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return max(w.end_s for w in self.walkers) + 1.0

    def true_events(self, step_s: float = 0.01) -> list[TrueEvent]:
        """The events of the scene, from each walker's path sampled finely (``step_s``)."""
        events: list[TrueEvent] = []
        for walker in self.walkers:
            previous: tuple[float, float] | None = None
            inside: dict[str, float] = {}
            dwelt: set[str] = set()
            t = walker.start_s
            while t <= walker.end_s + step_s:
                at = walker.position(min(t, walker.end_s))
                assert at is not None
                point = (at[0] / self.width, at[1] / self.height)
                if previous is not None:
                    for line in self.lines:
                        a, b = line.points
                        before, after = cross(a, b, previous), cross(a, b, point)
                        if before != 0 and after != 0 and (before > 0) != (after > 0):
                            direction = Direction.IN if after > 0 else Direction.OUT
                            events.append(
                                TrueEvent(walker.name, AnalyticsKind.CROSSED, line.name, t, direction)
                            )
                for zone in self.zones:
                    now_inside = point_in_polygon(point, zone.points)
                    if now_inside and zone.name not in inside:
                        inside[zone.name] = t
                        events.append(TrueEvent(walker.name, AnalyticsKind.ENTERED, zone.name, t))
                    elif not now_inside and zone.name in inside:
                        del inside[zone.name]
                        dwelt.discard(zone.name)
                        events.append(TrueEvent(walker.name, AnalyticsKind.LEFT, zone.name, t))
                    elif (
                        now_inside
                        and zone.dwell_s is not None
                        and zone.name not in dwelt
                        and t - inside[zone.name] >= zone.dwell_s
                    ):
                        dwelt.add(zone.name)
                        events.append(TrueEvent(walker.name, AnalyticsKind.DWELL, zone.name, t))
                previous = point
                t += step_s
            for name in inside:  # it vanishes where it stands: it has left
                events.append(TrueEvent(walker.name, AnalyticsKind.LEFT, name, walker.end_s))
        return events

    def boxes(self, t: float) -> list[tuple[Walker, Box]]:
        """Every walker in view at ``t`` with its true box."""
        return [(w, box) for w in self.walkers if (box := w.box(t)) is not None]


# --- the project's scenes -------------------------------------------------------------------------

FRAME = (768, 432)
DOOR = Line(name="door", points=((0.5, 0.05), (0.5, 0.95)))
SHOP = Zone(name="shop", points=[(0.6, 0.3), (0.9, 0.3), (0.9, 0.95), (0.6, 0.95)], dwell_s=3.0)


def single_file(speed: float, confidence: float, *, walkers: int = 6, size: float = 1.0) -> Scene:
    """Walkers one at a time across the frame, alternately left to right and back, each crossing the
    door line and passing through the shop zone; ``size`` scales their boxes (1: 50 x 120 px)."""
    width, height = FRAME
    people: list[Walker] = []
    t = 1.0
    for i in range(walkers):
        y = 250.0 + (i % 3) * 40.0
        path = ((30.0, y), (width - 30.0, y)) if i % 2 == 0 else ((width - 30.0, y), (30.0, y))
        walker = Walker(f"w{i}", path, speed, t, w=50 * size, h=120 * size, confidence=confidence)
        people.append(walker)
        t = walker.end_s + 1.5
    return Scene(f"single-file {speed:g} px/s conf {confidence:g}", width, height, people, [SHOP], [DOOR])


def passing(speed: float, confidence: float) -> Scene:
    """Two groups walking towards each other on nearby paths: they meet and overlap by the door (the
    one behind is hidden for a moment), the test of identities."""
    width, height = FRAME
    people = []
    for i in range(3):
        y = 280.0 + i * 25.0
        people.append(
            Walker(
                f"r{i}", ((30.0, y), (width - 30.0, y + 20.0)), speed, 1.0 + i * 1.2, confidence=confidence
            )
        )
        people.append(
            Walker(
                f"l{i}", ((width - 30.0, y + 20.0), (30.0, y)), speed, 1.0 + i * 1.2, confidence=confidence
            )
        )
    return Scene(f"passing {speed:g} px/s conf {confidence:g}", width, height, people, [SHOP], [DOOR])


def dwelling(confidence: float) -> Scene:
    """Walkers who stop in the shop zone: some longer than its dwell time (a dwell event), some not."""
    width, height = FRAME
    people = []
    t = 1.0
    for i, stay in enumerate((5.0, 0.5, 8.0, 4.0)):  # inside about 1.5 s longer than the stay
        y = 300.0 + (i % 2) * 50.0
        path = ((30.0, y), (560.0, y), (width - 30.0, y))
        walker = Walker(f"d{i}", path, 150.0, t, confidence=confidence, pause_s=(stay,))
        people.append(walker)
        t = walker.end_s + 1.5
    return Scene(f"dwelling conf {confidence:g}", width, height, people, [SHOP], [DOOR])
