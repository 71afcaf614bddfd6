"""Which of a stream's processed frames are stored (the ``store`` option, core/retention.py).

``changes`` stores a frame when what is in view changed since the last stored frame: the set of
tracked objects and the zones each stands in (untracked: how many of each class), or when objects
have stayed ``store_every_s`` since; a frame that carries an event is always stored. A parked car
is then stored once a minute, not five times a second.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from core.detections import DetectedObject
from core.retention import StorePolicy


class StoreGate:
    """Decides, frame by frame, whether a processed frame is stored."""

    def __init__(self, policy: StorePolicy | str, every_s: float) -> None:
        self.policy = StorePolicy(policy)
        self.every_s = every_s
        self._stored_view: frozenset[object] | None = None
        self._stored_at: float | None = None

    def should_store(
        self,
        objects: list[DetectedObject],
        zones_of: Mapping[int, frozenset[str]],
        has_events: bool,
        now: float,
    ) -> bool:
        """Whether the frame captured at ``now`` is stored; ``zones_of``: each track's zones now."""
        if self.policy is StorePolicy.ALL:
            return True
        if has_events:
            return self._stored(objects, zones_of, now)
        if self.policy is StorePolicy.EVENTS:
            return False
        if not objects:
            if self.policy is StorePolicy.CHANGES and self._stored_view:
                return self._stored(objects, zones_of, now)  # the scene emptied: a change worth a frame
            return False
        if self.policy is StorePolicy.OBJECTS:
            return True
        view = _view(objects, zones_of)
        if view != self._stored_view or self._stored_at is None or now - self._stored_at >= self.every_s:
            return self._stored(objects, zones_of, now)
        return False

    def _stored(
        self, objects: list[DetectedObject], zones_of: Mapping[int, frozenset[str]], now: float
    ) -> bool:
        self._stored_view = _view(objects, zones_of)
        self._stored_at = now
        return True


def _view(objects: list[DetectedObject], zones_of: Mapping[int, frozenset[str]]) -> frozenset[object]:
    """What is in view: each tracked object with its zones; untracked ones by class and count."""
    tracked = {(o.track_id, zones_of.get(o.track_id, frozenset())) for o in objects if o.track_id is not None}
    untracked = Counter(o.class_name for o in objects if o.track_id is None)
    return frozenset(tracked) | frozenset(untracked.items())
