"""At-least-once offset commits for records that finish out of order.

A record is settled when the service is done with it (a frame stored, dropped or discarded; a
command handled). The offset committed for a partition is the lowest one still unsettled, so a
restart redelivers every record that was not finished and never skips one.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiokafka import TopicPartition


class OffsetTracker:
    """Per partition: offsets seen but not settled, and the next offset after the highest seen."""

    def __init__(self) -> None:
        self._pending: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def seen(self, tp: TopicPartition, offset: int) -> None:
        self._pending.setdefault(tp, set()).add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def settle(self, tp: TopicPartition, offset: int) -> None:
        """Mark a record done; unknown records (a partition since revoked) are ignored."""
        pending = self._pending.get(tp)
        if pending is not None:
            pending.discard(offset)

    def unsettled(self, tp: TopicPartition) -> int:
        return len(self._pending.get(tp, ()))

    def to_commit(self, assigned: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Offsets to commit for the ``assigned`` partitions that moved since the last commit."""
        offsets = {}
        for tp in assigned:
            if tp not in self._next:
                continue
            pending = self._pending.get(tp)
            safe = min(pending) if pending else self._next[tp]
            if self._committed.get(tp) != safe:
                offsets[tp] = safe
        return offsets

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop revoked partitions: their records belong to another member now."""
        for tp in partitions:
            self._pending.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)
