"""The demo's progress: one line per poll, made only from what the HTTP API says about the stream.

Each line: the time, the lifecycle state, the newest stored frame's number and age, the rate at
which stored frame numbers advance (frames/s between two polls) and the objects in that frame::

    12:03:04  ml_started              newest frame 105 (0.6 s old)   4.8 frames/s   3 person, 1 car
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rich.text import Text

from cli.api_client import LookoutClient
from core.states import StreamState


def summarise_objects(objects: list[dict[str, Any]]) -> str:
    """``3 person, 1 car``: the objects of a detection counted by class, most frequent first."""
    counts = Counter(str(item["class"]) for item in objects)
    return ", ".join(f"{n} {name}" for name, n in counts.most_common()) or "no objects"


def state_style(state: StreamState) -> str:
    """The colour of a state on a terminal: running green, stopping yellow, failed red."""
    if state is StreamState.INACTIVE_ERROR:
        return "bold red"
    if state.is_shutting_down:
        return "yellow"
    return "green" if state is StreamState.ML_STARTED else "cyan"


@dataclass(frozen=True)
class NewestFrame:
    """The stream's newest stored detection, as ``GET /detection_result?limit=1`` returns it."""

    frame_seq: int
    capture_time: datetime
    objects: list[dict[str, Any]]

    @classmethod
    def from_page(cls, page: dict[str, Any]) -> NewestFrame | None:
        """The first item of a detection page, or None while nothing is stored."""
        if not page["items"]:
            return None
        item = page["items"][0]
        captured = datetime.fromisoformat(item["capture_time"])
        if captured.tzinfo is None:  # the API sends UTC; a bare time would not subtract from an aware one
            captured = captured.replace(tzinfo=UTC)
        return cls(int(item["frame_seq"]), captured, item["objects"])


class StreamProgress:
    """Polls one stream through the API; remembers the previous poll to tell the rate."""

    def __init__(self, client: LookoutClient, stream_id: str) -> None:
        self.client = client
        self.stream_id = stream_id
        self._previous: tuple[float, int] | None = None  # (monotonic time, newest frame number)

    def poll(self) -> tuple[StreamState, Text]:
        """The stream's state now and its progress line."""
        body = self.client.state(self.stream_id)
        state = StreamState(body["state"])
        newest = NewestFrame.from_page(self.client.results(self.stream_id, limit=1))
        line = Text.assemble(f"{datetime.now():%H:%M:%S}  ", (f"{state.value:<22}", state_style(state)))
        line.append("  ")
        line.append(self._frame_part(newest) if newest else "no frame stored yet")
        if body.get("error_reason"):
            line.append(f"  ({body['error_reason']})", style="red")
        return state, line

    def _frame_part(self, newest: NewestFrame) -> str:
        age_s = (datetime.now(UTC) - newest.capture_time).total_seconds()
        now = time.monotonic()
        rate = "   -"
        if self._previous is not None and now > self._previous[0]:
            rate = f"{(newest.frame_seq - self._previous[1]) / (now - self._previous[0]):4.1f}"
        self._previous = (now, newest.frame_seq)
        return (
            f"newest frame {newest.frame_seq} ({age_s:.1f} s old)  {rate} frames/s"
            f"   {summarise_objects(newest.objects)}"
        )
