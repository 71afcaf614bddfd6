"""The tracker at the frame rates people run (2-30 fps), on scenes with known truth, offline."""

from __future__ import annotations

import pytest

from core.detections import Box, DetectedObject
from deploy.camera.scenes import dwelling, passing, single_file
from tests.counting import bytetrack, count_offline
from workers.ml.tracking import MotionTracker


@pytest.mark.parametrize("fps", [2.0, 5.0, 10.0, 30.0])
def test_walkers_one_at_a_time_are_counted_exactly_at_every_frame_rate(fps: float) -> None:
    for speed, confidence in ((100.0, 0.5), (100.0, 0.9), *(((200.0, 0.6), (300.0, 0.8)) if fps > 2 else ())):
        score = count_offline(single_file(speed, confidence), fps)
        assert score.missed.total() == 0 and score.extra.total() == 0, (speed, confidence, score)
        assert score.id_switches == 0


def test_at_5_fps_bytetrack_misses_the_crossings_lookouts_tracker_counts() -> None:
    """Why the tracker is Lookout's own: ByteTrack's IoU gate never confirms a walker at 5 fps."""
    scene = single_file(100.0, 0.6)
    assert count_offline(scene, 5.0, bytetrack).found["crossed"] == 0
    assert count_offline(scene, 5.0).found["crossed"] == scene_crossings(scene)


def scene_crossings(scene) -> int:  # type: ignore[no-untyped-def]
    return sum(e.kind.value == "crossed" for e in scene.true_events())


def test_groups_passing_each_other_are_all_counted() -> None:
    for fps in (5.0, 10.0):
        score = count_offline(passing(150.0, 0.7), fps)
        assert score.found["crossed"] == score.true["crossed"] and score.extra.total() == 0, score


def test_dwells_are_told_from_brief_stops() -> None:
    score = count_offline(dwelling(0.7), 5.0)
    assert score.true["dwell"] == 3 and score.found["dwell"] == 3 and score.extra.total() == 0, score


def test_detections_that_join_no_track_are_counted_and_ids_start_where_told() -> None:
    tracker = MotionTracker(first_id=500)
    weak = DetectedObject(class_name="person", class_id=0, confidence=0.27, box=Box(x1=0, y1=0, x2=40, y2=90))
    sure = DetectedObject(
        class_name="person", class_id=0, confidence=0.8, box=Box(x1=300, y1=0, x2=340, y2=90)
    )
    first = tracker.update([weak, sure], 0.0)
    assert first.unmatched == 1 and [o.track_id for o in first.objects] == [None, None]  # tentative
    second = tracker.update([sure], 0.2)
    assert [o.track_id for o in second.objects] == [500] and set(second.seeds) == {500}
