"""Zones, lines and the events they yield: the contracts of stream analytics (light: no numpy).

A stream's options may name polygons (zones) and segments (lines) in normalised image coordinates
(0..1, x right, y down). The stream's detection process tracks objects and turns their tracks into
events: ``entered`` and ``left`` a zone, ``dwell`` (in a zone past its dwell time) and ``crossed`` a
line, with a direction. An object's position is the bottom centre of its box (where it stands).

A line's direction: looking from its first point to its second, ``in`` is a crossing from the left
side to the right side, ``out`` the other way.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from core.text import StorableText

# The classes of the shipped COCO model (ultralytics' coco.yaml, in class-id order; a test checks).
COCO_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
MAX_POINTS = 32
MAX_SHAPES = 16  # zones and lines each, per stream
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$")

Point = tuple[float, float]


class AnalyticsKind(StrEnum):
    ENTERED = "entered"
    LEFT = "left"
    DWELL = "dwell"
    CROSSED = "crossed"


class EventCause(StrEnum):
    """Why an event came other than from what the camera showed."""

    RESTART = "restart"  # the detection process restarted: the visits it had open are closed


class Direction(StrEnum):
    IN = "in"  # from the left of first→second point to its right
    OUT = "out"


def _point_in_range(point: Point) -> Point:
    x, y = point
    if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
        raise ValueError(f"point ({x}, {y}) is outside the image: coordinates are fractions 0..1")
    return point


def _known_classes(classes: list[str] | None) -> list[str] | None:
    if classes is None:
        return None
    unknown = sorted({name for name in classes if name not in COCO_NAMES})
    if unknown:
        raise ValueError(f"unknown class(es) {', '.join(map(repr, unknown))}: the model knows the COCO names")
    return classes


def _shape_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise ValueError(
            "a name is 1-64 letters, digits, spaces, '_', '.' or '-', starting with a letter or digit"
        )
    return name


NormalisedPoint = Annotated[Point, AfterValidator(_point_in_range)]
ShapeName = Annotated[str, AfterValidator(_shape_name)]
WatchedClasses = Annotated[
    list[StorableText] | None,
    Field(default=None, max_length=80, description="Class names it watches (all if unset)"),
    AfterValidator(_known_classes),
]


def cross(o: Point, a: Point, b: Point) -> float:
    """The z of (a - o) x (b - o). In image coordinates (y down) it is > 0 when b lies on the right
    of o→a as seen on the screen, < 0 on its left."""
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def segments_intersect(p1: Point, p2: Point, q1: Point, q2: Point) -> bool:
    """Whether segments p1p2 and q1q2 share a point (touching counts)."""
    d1, d2 = cross(q1, q2, p1), cross(q1, q2, p2)
    d3, d4 = cross(p1, p2, q1), cross(p1, p2, q2)
    if ((d1 > 0 > d2) or (d1 < 0 < d2)) and ((d3 > 0 > d4) or (d3 < 0 < d4)):
        return True

    def on_segment(a: Point, b: Point, c: Point) -> bool:
        return min(a[0], b[0]) <= c[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= c[1] <= max(a[1], b[1])

    return (
        (d1 == 0 and on_segment(q1, q2, p1))
        or (d2 == 0 and on_segment(q1, q2, p2))
        or (d3 == 0 and on_segment(p1, p2, q1))
        or (d4 == 0 and on_segment(p1, p2, q2))
    )


def distance_to_segment(p: Point, a: Point, b: Point) -> float:
    """The distance from ``p`` to the segment ``ab``."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    length2 = dx * dx + dy * dy
    f = 0.0 if length2 == 0 else max(0.0, min(1.0, ((p[0] - a[0]) * dx + (p[1] - a[1]) * dy) / length2))
    return math.hypot(p[0] - (a[0] + f * dx), p[1] - (a[1] + f * dy))


def distance_to_border(p: Point, polygon: list[Point]) -> float:
    """The distance from ``p`` to the nearest edge of ``polygon``."""
    return min(distance_to_segment(p, a, b) for a, b in zip(polygon, polygon[1:] + polygon[:1], strict=True))


def polygon_area(points: list[Point]) -> float:
    return abs(sum(cross((0.0, 0.0), a, b) for a, b in zip(points, points[1:] + points[:1], strict=True))) / 2


def point_in_polygon(point: Point, polygon: list[Point]) -> bool:
    """Ray casting; a point on the border may fall either way."""
    x, y = point
    inside = False
    for (x1, y1), (x2, y2) in zip(polygon, polygon[1:] + polygon[:1], strict=True):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


class Zone(BaseModel):
    """A named polygon; objects of its classes standing in it are counted, with entered/left/dwell."""

    model_config = ConfigDict(extra="forbid")

    name: ShapeName
    points: list[NormalisedPoint] = Field(
        min_length=3, max_length=MAX_POINTS, description="Polygon corners, 0..1"
    )
    classes: WatchedClasses = None
    dwell_s: float | None = Field(
        default=None, gt=0, le=86_400, description="A 'dwell' event when an object stays this long"
    )

    @model_validator(mode="after")
    def _simple_polygon(self) -> Self:
        points = list(self.points)
        edges = list(zip(points, points[1:] + points[:1], strict=True))
        for i, (a1, a2) in enumerate(edges):
            for j in range(i + 1, len(edges)):
                if j == i + 1 or (i == 0 and j == len(edges) - 1):
                    continue  # neighbours share a corner
                if segments_intersect(a1, a2, *edges[j]):
                    raise ValueError(
                        f"zone {self.name!r} is a self-intersecting polygon (edges {i} and {j} cross)"
                    )
        if polygon_area(points) < 1e-6:
            raise ValueError(f"zone {self.name!r} has no area (its points are on one line)")
        return self


class Line(BaseModel):
    """A named segment; objects of its classes crossing it are counted per direction."""

    model_config = ConfigDict(extra="forbid")

    name: ShapeName
    points: tuple[NormalisedPoint, NormalisedPoint] = Field(description="Its two ends, 0..1")
    classes: WatchedClasses = None

    @model_validator(mode="after")
    def _has_length(self) -> Self:
        (x1, y1), (x2, y2) = self.points
        if (x1 - x2) ** 2 + (y1 - y2) ** 2 < 1e-8:
            raise ValueError(f"line {self.name!r} has both ends at the same point")
        return self


def shapes_problem(zones: list[Zone] | None, lines: list[Line] | None) -> str | None:
    """Why these zones and lines cannot go together (a name used twice), or None."""
    names = [z.name for z in zones or []] + [line.name for line in lines or []]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        return f"zone and line names must be unique: {', '.join(map(repr, twice))} used more than once"
    return None


class AnalyticsEvent(BaseModel):
    """One event of a stream: stored in ``events``, published on the events topic, sent to webhooks."""

    event_id: str = Field(description="Unique and stable: the same frame always gives the same ids")
    stream_id: str
    kind: AnalyticsKind
    zone: str = Field(description="The zone's or line's name")
    direction: Direction | None = Field(default=None, description="For 'crossed'")
    track_id: int
    class_name: str
    confidence: float
    frame_seq: int
    occurred_at: datetime = Field(description="Capture time of the frame that shows it")
    s3_key: str = Field(description="The annotated frame that shows it")
    dwell_s: float | None = Field(default=None, description="For 'dwell' and 'left': time spent in the zone")
    cause: EventCause | None = Field(
        default=None,
        description="Why a 'left' came when the object was not seen walking out: 'restart', the stream's"
        " detection process restarted and its tracks were lost with it",
    )


def event_id(stream_id: str, frame_seq: int, kind: AnalyticsKind, shape: str, track_id: int) -> str:
    """The event's id: a redelivered frame yields the same ids, so it stores no second event."""
    return f"{stream_id}:{frame_seq}:{kind.value}:{shape}:{track_id}"
