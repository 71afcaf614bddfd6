"""Pick frames for the requested rate from the times frames really arrive, not from what a camera claims."""

from __future__ import annotations


class FrameSampler:
    """Decides, frame by frame, whether a frame read at a given time is published.

    It keeps a schedule of due times ``interval`` apart: a frame at or after the due time is taken and
    the next due time moves one interval on, so the long-run rate matches the request even when frames
    arrive with jitter. A camera slower than the request yields every frame, never duplicates; after a
    stall or a burst (buffered frames right after connecting) the schedule restarts from the frame in
    hand, so nothing floods out. The camera's reported fps (often 0 or nonsense) is never used.
    """

    def __init__(self, fps: float, *, tolerance: float = 0.1) -> None:
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.interval = 1.0 / fps
        # A frame up to this early still counts as on time: with a camera at twice the requested rate,
        # jitter would otherwise make every other due frame slip by a whole camera period.
        self._early = tolerance * self.interval
        self._next_due: float | None = None

    def take(self, now: float) -> bool:
        """True when the frame read at ``now`` (monotonic seconds) is to be published."""
        if self._next_due is not None and now < self._next_due - self._early:
            return False
        on_schedule = self._next_due is not None and now - self._next_due < self.interval
        base = self._next_due if on_schedule and self._next_due is not None else now
        self._next_due = base + self.interval
        return True

    def reset(self) -> None:
        """Forget the schedule (a new connection starts a new one)."""
        self._next_due = None
