"""What ``lookout-mqtt`` publishes where: the two topic layouts and Home Assistant discovery.

The ``lookout`` layout (prefix ``P``, default ``lookout``):

| topic | payload | retained |
|---|---|---|
| ``P/available`` | ``online`` / ``offline`` (the sink's last will) | yes |
| ``P/<stream id>/events`` | every zone, line and health event as JSON (dedupe on ``event_id``) | no |
| ``P/<stream id>/availability`` | ``online`` while the stream runs and its camera gives frames, else ``offline`` | yes |
| ``P/<stream id>/zone/<zone>/occupancy`` | objects in the zone now | yes |
| ``P/<stream id>/line/<line>/in``, ``.../out`` | crossings counted each way | yes |
| ``P/<stream id>/snapshot`` | a link to the newest event's annotated frame | yes |

The ``frigate`` layout keeps Frigate's topics, so automations written for Frigate keep working (the
stream id stands for Frigate's camera name): ``P/available``, ``P/events`` (``{"type": "new" |
"update" | "end", "before", "after"}``: ``entered`` is new, ``dwell`` and ``crossed`` update, ``left``
ends), ``P/<zone>/all`` (occupancy; zone names share one namespace as in Frigate),
``P/<camera>/status/detect`` (``online`` / ``offline``), and what Frigate has no topic for:
``P/<camera>/health`` (health events), ``P/<camera>/<line>/in|out``, ``P/<camera>/snapshot_url``.

Home Assistant discovery (``<discovery prefix>/<component>/lookout_<stream id>/<object>/config``, one
device per running stream): a ``connectivity`` binary sensor (the stream's availability), a sensor
per zone (occupancy) and per line and direction (crossings), an ``image`` of the newest snapshot
(``url_topic``). Entities follow the sink's availability; a stream that ends has its entities
removed (empty retained configs) and its retained topics cleared.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

from core.analytics import AnalyticsEvent, AnalyticsKind
from core.health_events import HealthEvent

ONLINE = "online"
OFFLINE = "offline"
FRIGATE_TYPES = {
    AnalyticsKind.ENTERED: "new",
    AnalyticsKind.DWELL: "update",
    AnalyticsKind.CROSSED: "update",
    AnalyticsKind.LEFT: "end",
}
SLUG = re.compile(r"[^a-zA-Z0-9_-]+")


@dataclass(frozen=True)
class Publication:
    topic: str
    payload: bytes
    retain: bool = False


class Layout(Protocol):
    @property
    def prefix(self) -> str: ...

    def available(self) -> str: ...
    def event(self, event: AnalyticsEvent | HealthEvent) -> Publication: ...
    def stream_availability(self, stream_id: str) -> str: ...
    def occupancy(self, stream_id: str, zone: str) -> str: ...
    def crossings(self, stream_id: str, line: str, direction: str) -> str: ...
    def snapshot(self, stream_id: str) -> str: ...


@dataclass(frozen=True)
class LookoutLayout:
    prefix: str

    def available(self) -> str:
        return f"{self.prefix}/available"

    def event(self, event: AnalyticsEvent | HealthEvent) -> Publication:
        return Publication(f"{self.prefix}/{event.stream_id}/events", event.model_dump_json().encode())

    def stream_availability(self, stream_id: str) -> str:
        return f"{self.prefix}/{stream_id}/availability"

    def occupancy(self, stream_id: str, zone: str) -> str:
        return f"{self.prefix}/{stream_id}/zone/{zone}/occupancy"

    def crossings(self, stream_id: str, line: str, direction: str) -> str:
        return f"{self.prefix}/{stream_id}/line/{line}/{direction}"

    def snapshot(self, stream_id: str) -> str:
        return f"{self.prefix}/{stream_id}/snapshot"


@dataclass(frozen=True)
class FrigateLayout:
    prefix: str

    def available(self) -> str:
        return f"{self.prefix}/available"

    def event(self, event: AnalyticsEvent | HealthEvent) -> Publication:
        if isinstance(event, HealthEvent):
            return Publication(f"{self.prefix}/{event.stream_id}/health", event.model_dump_json().encode())
        after = {
            "id": f"{event.stream_id}:{event.track_id}",  # Frigate's id names the tracked object
            "camera": event.stream_id,
            "label": event.class_name,
            "score": event.confidence,
            "top_score": event.confidence,
            "frame_time": event.occurred_at.timestamp(),
            "start_time": event.occurred_at.timestamp(),
            "end_time": event.occurred_at.timestamp() if event.kind is AnalyticsKind.LEFT else None,
            "current_zones": [] if event.kind is AnalyticsKind.LEFT else [event.zone],
            "entered_zones": [event.zone],
            "false_positive": False,
            "has_snapshot": True,
            "has_clip": False,
            "lookout_event_id": event.event_id,
            "lookout_kind": event.kind.value,
            "direction": event.direction.value if event.direction else None,
        }
        body = {"type": FRIGATE_TYPES[event.kind], "before": after, "after": after}
        return Publication(f"{self.prefix}/events", json.dumps(body).encode())

    def stream_availability(self, stream_id: str) -> str:
        return f"{self.prefix}/{stream_id}/status/detect"

    def occupancy(self, stream_id: str, zone: str) -> str:
        return f"{self.prefix}/{zone}/all"

    def crossings(self, stream_id: str, line: str, direction: str) -> str:
        return f"{self.prefix}/{stream_id}/{line}/{direction}"

    def snapshot(self, stream_id: str) -> str:
        return f"{self.prefix}/{stream_id}/snapshot_url"


def layout_of(kind: str, prefix: str) -> Layout:
    return FrigateLayout(prefix) if kind == "frigate" else LookoutLayout(prefix)


def slug(name: str) -> str:
    """``name`` as Home Assistant allows in a discovery topic's object id."""
    return SLUG.sub("_", name).strip("_").lower() or "x"


def object_id(name: str) -> str:
    """A shape's part of an object id: its slug and a hash of the name itself, so that two names with
    one slug ("Front door", "front_door") stay two entities."""
    return f"{slug(name)}_{hashlib.sha256(name.encode()).hexdigest()[:6]}"


@dataclass(frozen=True)
class StreamShapes:
    """What a running stream has entities for."""

    stream_id: str
    zones: tuple[str, ...]
    lines: tuple[str, ...]


def discovery(layout: Layout, discovery_prefix: str, stream: StreamShapes, version: str) -> list[Publication]:
    """The retained discovery configs of one stream's device."""
    sid = stream.stream_id
    node = f"lookout_{slug(sid)}"
    short = sid[:8]
    device = {
        "identifiers": [node],
        "name": f"Lookout stream {short}",
        "manufacturer": "Lookout",
        "model": "RTSP stream",
        "sw_version": version,
    }
    origin = {"name": "Lookout", "sw_version": version}
    service = {"topic": layout.available()}
    stream_and_service = [service, {"topic": layout.stream_availability(sid)}]

    def config(component: str, entity: str, **fields: Any) -> Publication:
        body = {
            "unique_id": f"{node}_{entity}",
            "default_entity_id": f"{component}.lookout_{slug(short)}_{entity}",
            "device": device,
            "origin": origin,
            **fields,
        }
        topic = f"{discovery_prefix}/{component}/{node}/{entity}/config"
        return Publication(topic, json.dumps(body).encode(), retain=True)

    configs = [
        config(
            "binary_sensor", "camera", name="Camera", state_topic=layout.stream_availability(sid),
            payload_on=ONLINE, payload_off=OFFLINE, device_class="connectivity", availability=[service],
        ),
        config("image", "snapshot", name="Snapshot", url_topic=layout.snapshot(sid),
               availability=stream_and_service, availability_mode="all"),
    ]  # fmt: skip
    for zone in stream.zones:
        configs.append(
            config(
                "sensor", f"zone_{object_id(zone)}_occupancy", name=f"{zone} occupancy",
                state_topic=layout.occupancy(sid, zone), state_class="measurement",
                unit_of_measurement="objects", icon="mdi:account-multiple",
                availability=stream_and_service, availability_mode="all",
            )
        )  # fmt: skip
    for line in stream.lines:
        for direction in ("in", "out"):
            configs.append(
                config(
                    "sensor", f"line_{object_id(line)}_{direction}", name=f"{line} {direction}",
                    state_topic=layout.crossings(sid, line, direction), state_class="total_increasing",
                    unit_of_measurement="crossings", icon="mdi:counter",
                    availability=stream_and_service, availability_mode="all",
                )
            )  # fmt: skip
    return configs
