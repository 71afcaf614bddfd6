"""The demo's progress: one line per poll, made only from what the HTTP API says about the stream.

Each line: the time, the lifecycle state, the frames ML stored and processes per second (its last
heartbeat, in the stream's health), the age of the newest stored frame and the objects in it, and
each service's health::

    12:03:04  ml_started   stored 105   4.8 fps   newest 0.6 s old   3 person, 1 car   runner ok  ml ok
"""

from __future__ import annotations

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
    """Polls one stream through the API."""

    def __init__(self, client: LookoutClient, stream_id: str) -> None:
        self.client = client
        self.stream_id = stream_id

    def poll(self) -> tuple[StreamState, Text]:
        """The stream's state now and its progress line."""
        body = self.client.state(self.stream_id)
        state = StreamState(body["state"])
        newest = NewestFrame.from_page(self.client.results(self.stream_id, limit=1))
        line = Text.assemble(f"{datetime.now():%H:%M:%S}  ", (f"{state.value:<22}", state_style(state)))
        line.append(f"  {self._figures_part(body.get('health'))}")
        line.append(f"   {self._frame_part(newest)}" if newest else "   no frame stored yet")
        for name, service in sorted(((body.get("health") or {}).get("services") or {}).items()):
            status = service["status"]
            line.append(f"   {name} ", style="dim")
            line.append(status, style="green" if status == "ok" else "yellow")
        if body.get("error_reason"):
            line.append(f"  ({body['error_reason']})", style="red")
        return state, line

    @staticmethod
    def _figures_part(health: dict[str, Any] | None) -> str:
        ml = ((health or {}).get("services") or {}).get("ml") or {}
        figures = ml.get("figures") or {}
        stored = figures.get("frames_stored")
        if stored is None:
            return "stored    -     -  fps"
        return f"stored {stored:<5} {figures.get('fps', 0.0):4.1f} fps"

    @staticmethod
    def _frame_part(newest: NewestFrame) -> str:
        age_s = (datetime.now(UTC) - newest.capture_time).total_seconds()
        return f"newest {age_s:.1f} s old   {summarise_objects(newest.objects)}"
