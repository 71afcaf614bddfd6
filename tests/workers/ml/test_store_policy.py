"""The store policy, frame by frame (workers/ml/store_policy.py): what each policy stores."""

from __future__ import annotations

from core.detections import Box, DetectedObject
from core.retention import StorePolicy
from workers.ml.store_policy import StoreGate


def person(track_id: int | None) -> DetectedObject:
    return DetectedObject(
        class_name="person", class_id=0, confidence=0.8, box=Box(x1=1, y1=2, x2=30, y2=40), track_id=track_id
    )


def run(
    gate: StoreGate, frames: list[tuple[list[DetectedObject], dict[int, frozenset[str]], bool]], fps: float
) -> list[int]:
    """The indexes of the frames stored."""
    return [
        i
        for i, (objects, zones, events) in enumerate(frames)
        if gate.should_store(objects, zones, events, i / fps)
    ]


def test_all_stores_every_frame_and_objects_every_frame_with_objects() -> None:
    frames = [([], {}, False), ([person(1)], {}, False), ([], {}, False), ([person(1)], {}, False)]
    assert run(StoreGate(StorePolicy.ALL, 60), frames, 5) == [0, 1, 2, 3]
    assert run(StoreGate("objects", 60), frames, 5) == [1, 3]


def test_changes_stores_a_still_object_once_then_every_store_every_s() -> None:
    still = [([person(1)], {}, False)] * 300  # 60 s at 5 fps
    stored = run(StoreGate(StorePolicy.CHANGES, 20), still, 5)
    assert stored == [0, 100, 200], "the first frame, then one every 20 s"


def test_changes_stores_when_an_object_comes_leaves_or_moves_into_a_zone() -> None:
    door = frozenset({"door"})
    frames = [
        ([person(1)], {}, False),
        ([person(1)], {}, False),
        ([person(1), person(2)], {}, False),  # one came
        ([person(1), person(2)], {2: door}, False),  # 2 stepped into the door zone
        ([person(1), person(2)], {2: door}, False),
        ([person(1)], {}, False),  # 2 left
        ([], {}, False),  # the scene emptied
        ([], {}, False),
        ([person(None)], {}, False),  # untracked: by class and count
        ([person(None)], {}, False),
    ]
    assert run(StoreGate(StorePolicy.CHANGES, 60), frames, 5) == [0, 2, 3, 5, 6, 8]


def test_events_stores_only_frames_that_carry_an_event_and_every_policy_stores_those() -> None:
    frames = [
        ([person(1)], {}, False),
        ([person(1)], {1: frozenset({"door"})}, True),
        ([person(1)], {}, False),
    ]
    assert run(StoreGate(StorePolicy.EVENTS, 60), frames, 5) == [1]
    for policy in StorePolicy:
        assert 1 in run(StoreGate(policy, 60), frames, 5)
