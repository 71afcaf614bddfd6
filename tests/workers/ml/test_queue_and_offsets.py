"""The bounded frame queue and the at-least-once offset bookkeeping, without servers."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition

from workers.ml.stream import FrameQueue
from workers.offsets import OffsetTracker


def test_full_queue_drops_its_oldest_frame_counts_it_and_keeps_the_newest() -> None:
    queue: FrameQueue[int] = FrameQueue(3)
    evicted = [queue.offer(i) for i in range(10)]
    assert evicted == [None, None, None, 0, 1, 2, 3, 4, 5, 6]
    assert queue.dropped == 7
    assert queue.high_water == 3
    assert [queue.take(), queue.take(), queue.take(), queue.take()] == [7, 8, 9, None]


def test_queue_drain_empties_it_in_order() -> None:
    queue: FrameQueue[str] = FrameQueue(2)
    queue.offer("a")
    queue.offer("b")
    assert queue.drain() == ["a", "b"]
    assert len(queue) == 0
    assert queue.dropped == 0


def test_queue_needs_room_for_a_frame() -> None:
    with pytest.raises(ValueError):
        FrameQueue(0)


def test_commit_offset_stays_below_the_oldest_unsettled_record() -> None:
    tp = TopicPartition("frames", 0)
    other = TopicPartition("commands", 0)
    tracker = OffsetTracker()
    for offset in range(5):
        tracker.seen(tp, offset)
    tracker.settle(tp, 0)
    tracker.settle(tp, 2)  # settled out of order: 1 is still in hand
    assert tracker.to_commit([tp, other]) == {tp: 1}
    tracker.committed({tp: 1})
    assert tracker.to_commit([tp]) == {}, "nothing moved since the last commit"
    for offset in (1, 3, 4):
        tracker.settle(tp, offset)
    assert tracker.to_commit([tp]) == {tp: 5}


def test_revoked_partition_is_forgotten_and_its_late_settlements_ignored() -> None:
    tp = TopicPartition("frames", 1)
    tracker = OffsetTracker()
    tracker.seen(tp, 10)
    tracker.forget([tp])
    tracker.settle(tp, 10)
    assert tracker.to_commit([tp]) == {}
