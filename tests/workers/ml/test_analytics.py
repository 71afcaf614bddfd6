"""Zone and line events from tracks (unit), the tracker on detections, and the zone/line rules."""

from __future__ import annotations

from core.analytics import COCO_NAMES, AnalyticsKind, Direction, EventCause, Line, Zone
from core.detections import Box, DetectedObject
from workers.ml.analytics import ZoneAnalytics
from workers.ml.tracking import MotionTracker

W, H = 1000, 1000
DOOR = Line(name="door", points=((0.5, 0.0), (0.5, 1.0)))  # vertical: left→right of the screen is 'out'
BAY = Zone(name="bay", points=[(0.6, 0.0), (1.0, 0.0), (1.0, 1.0), (0.6, 1.0)], dwell_s=2.0)


def person(x: float, track_id: int | None = 1, y: float = 0.5, cls: str = "person") -> DetectedObject:
    """An object standing at (x, y) (fractions): its box's bottom centre."""
    cx, bottom = x * W, y * H
    return DetectedObject(
        class_name=cls,
        class_id=COCO_NAMES.index(cls),
        confidence=0.9,
        box=Box(x1=cx - 20, y1=bottom - 100, x2=cx + 20, y2=bottom),
        track_id=track_id,
    )


def walk(analytics: ZoneAnalytics, xs: list[float], track_id: int = 1, t0: float = 0.0, dt: float = 0.5):  # type: ignore[no-untyped-def]
    events = []
    for i, x in enumerate(xs):
        events += analytics.update([person(x, track_id)], W, H, t0 + i * dt)
    return events


def test_crossing_a_line_counts_each_direction_once() -> None:
    analytics = ZoneAnalytics([], [DOOR])
    there = walk(analytics, [0.3, 0.4, 0.45, 0.55, 0.7])
    back = walk(analytics, [0.6, 0.52, 0.48, 0.3], t0=10)
    assert [(e.kind, e.direction) for e in there] == [(AnalyticsKind.CROSSED, Direction.OUT)]
    assert [(e.kind, e.direction) for e in back] == [(AnalyticsKind.CROSSED, Direction.IN)]
    assert analytics.line_counts["door"] == {Direction.IN: 1, Direction.OUT: 1}


def test_a_step_onto_the_line_and_back_is_no_crossing() -> None:
    analytics = ZoneAnalytics([], [DOOR])
    assert walk(analytics, [0.4, 0.5, 0.4, 0.45]) == []


def test_a_crossing_beside_the_segment_does_not_count() -> None:
    short = Line(name="gate", points=((0.5, 0.0), (0.5, 0.3)))
    analytics = ZoneAnalytics([], [short])
    assert walk(analytics, [0.3, 0.7]) == []  # at y=0.5: below the segment's end


def test_a_zone_sees_entered_dwell_and_left_in_that_order() -> None:
    analytics = ZoneAnalytics([BAY], [])
    events = walk(analytics, [0.5, 0.7, 0.75, 0.8, 0.8, 0.8, 0.8, 0.5])
    assert [e.kind for e in events] == [AnalyticsKind.ENTERED, AnalyticsKind.DWELL, AnalyticsKind.LEFT]
    dwell = events[1]
    assert dwell.dwell_s is not None and dwell.dwell_s >= 2.0
    assert analytics.occupancy() == {"bay": 0}


def test_occupancy_counts_the_tracks_inside_and_a_lost_track_leaves() -> None:
    analytics = ZoneAnalytics([BAY.model_copy(update={"dwell_s": None})], [], lost_after_s=2.0)
    analytics.update([person(0.7, 1), person(0.8, 2), person(0.2, 3)], W, H, 0.0)
    assert analytics.occupancy() == {"bay": 2}
    assert analytics.update([person(0.7, 1)], W, H, 1.0) == []  # track 2 unseen for 1 s: still there
    left = analytics.update([person(0.7, 1)], W, H, 3.0)
    assert [(e.kind, e.track_id) for e in left] == [(AnalyticsKind.LEFT, 2)]
    assert analytics.occupancy() == {"bay": 1}


def test_a_zone_watches_only_its_classes() -> None:
    cars = Zone(name="parking", points=BAY.points, classes=["car"])
    analytics = ZoneAnalytics([cars], [])
    assert analytics.update([person(0.8, 1)], W, H, 0.0) == []
    entered = analytics.update([person(0.8, 2, cls="car")], W, H, 0.5)
    assert [(e.kind, e.class_name) for e in entered] == [(AnalyticsKind.ENTERED, "car")]


def test_objects_without_a_track_make_no_events() -> None:
    analytics = ZoneAnalytics([BAY], [DOOR])
    assert analytics.update([person(0.3, None)], W, H, 0.0) == []
    assert analytics.update([person(0.8, None)], W, H, 0.5) == []


def test_the_tracker_keeps_an_objects_id_while_it_moves_and_bounds_its_memory() -> None:
    tracker = MotionTracker()
    ids = set()
    for step in range(10):
        tracked = tracker.update(
            [person(0.2 + step * 0.01, None), person(0.8 - step * 0.01, None, y=0.3)], step * 0.2
        )
        if step >= 1:  # a new track is confirmed on its second frame
            ids.add(tuple(o.track_id for o in tracked.objects))
    assert len(ids) == 1 and None not in next(iter(ids))
    # a long stream: 1,500 objects come and go; lost tracks are dropped
    analytics = ZoneAnalytics([BAY], [DOOR])
    now = 0.0
    for i in range(1500):
        for _ in range(2):
            now += 0.2
            result = tracker.update([person(0.1 + (i % 80) / 100, None)], now)
            analytics.update(result.objects, W, H, now, seeds=result.seeds)
        for _ in range(20):
            now += 0.2
            analytics.update(tracker.update([], now).objects, W, H, now)
    assert tracker.size <= 2
    assert tracker.next_id > 1500, "ids only grow"
    analytics.update([], W, H, now + 3.0)  # the last one is lost too
    assert analytics.occupancy() == {"bay": 0} and not analytics._tracks


def test_jitter_on_a_line_or_a_zone_border_is_no_crossing_and_no_second_entry() -> None:
    analytics = ZoneAnalytics([BAY], [DOOR])
    # standing on the line, then on the zone's border, the box jittering by 3 px at 30 fps
    on_line = [0.5 + (0.003 if i % 2 else -0.003) for i in range(60)]
    on_border = [0.6 + (0.003 if i % 2 else -0.003) for i in range(60)]
    events = walk(analytics, [0.3, *on_line, 0.55, *on_border, 0.8], dt=1 / 30)
    assert [(e.kind, e.zone) for e in events] == [
        (AnalyticsKind.CROSSED, "door"),
        (AnalyticsKind.ENTERED, "bay"),
    ]


def test_visits_a_restarted_process_inherits_are_closed_with_their_cause_and_new_tracks_are_new() -> None:
    analytics = ZoneAnalytics([BAY], [DOOR])
    closed = analytics.close_visits([("bay", 7, "person", 100.0), ("gone zone", 8, "person", 100.0)], 112.5)
    assert [(e.kind, e.zone, e.track_id, e.cause, e.dwell_s) for e in closed] == [
        (AnalyticsKind.LEFT, "bay", 7, EventCause.RESTART, 12.5)
    ]
    # the person still standing there is a new visit on a new track
    again = analytics.update([person(0.8, 9)], W, H, 113.0)
    assert [(e.kind, e.track_id, e.cause) for e in again] == [(AnalyticsKind.ENTERED, 9, None)]
    assert analytics.occupancy() == {"bay": 1}
