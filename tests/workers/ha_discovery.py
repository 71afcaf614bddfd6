"""Home Assistant's MQTT discovery schema for the components Lookout announces, as HA 2026.11 checks
it (homeassistant/components/mqtt/{binary_sensor,sensor,image,schemas,config,discovery}.py): the keys
each platform knows, the required and exclusive ones, the values it accepts. HA drops an unknown
top-level key silently, so a typo would go unnoticed there: here it fails. An unknown key inside
``device`` or ``origin`` makes HA refuse the whole message, as here."""

from __future__ import annotations

import re
from typing import Any

TOPIC = re.compile(
    r"^(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)/config$"
)
COMMON = {
    "availability_topic", "availability_template", "payload_available", "payload_not_available",
    "availability", "availability_mode", "device", "origin", "unique_id", "default_entity_id",
    "object_id", "entity_category", "enabled_by_default", "visible_by_default", "icon", "entity_picture",
    "json_attributes_topic", "json_attributes_template", "message_expiry_interval", "name", "qos",
    "encoding", "group",
}  # fmt: skip
READ_ONLY = {"state_topic", "value_template"}
PLATFORM_KEYS = {
    "binary_sensor": COMMON | READ_ONLY
    | {"payload_on", "payload_off", "off_delay", "expire_after", "force_update", "device_class"},
    "sensor": COMMON | READ_ONLY
    | {"device_class", "state_class", "unit_of_measurement", "suggested_display_precision", "options",
       "last_reset_value_template", "expire_after", "force_update"},
    "image": COMMON | {"image_topic", "url_topic", "url_template", "content_type", "image_encoding"},
}  # fmt: skip
DEVICE_KEYS = {
    "identifiers", "connections", "manufacturer", "model", "model_id", "name", "hw_version",
    "serial_number", "sw_version", "via_device", "suggested_area", "configuration_url", "child_device",
}  # fmt: skip
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
AVAILABILITY_ITEM_KEYS = {"topic", "payload_available", "payload_not_available", "value_template"}
BINARY_SENSOR_CLASSES = {
    "battery", "battery_charging", "carbon_monoxide", "cold", "connectivity", "door", "garage_door", "gas",
    "glass_break", "heat", "light", "lock", "moisture", "motion", "moving", "occupancy", "opening", "plug",
    "power", "presence", "problem", "running", "safety", "smoke", "sound", "tamper", "update", "vibration",
    "window",
}  # fmt: skip
STATE_CLASSES = {"measurement", "measurement_angle", "total", "total_increasing"}
MQTT_WILDCARDS = re.compile(r"[+#]")


def problems(topic: str, payload: dict[str, Any], discovery_prefix: str = "homeassistant") -> list[str]:
    """What Home Assistant would refuse (or silently drop) in this discovery message."""
    found: list[str] = []
    if not topic.startswith(discovery_prefix + "/"):
        return [f"{topic}: not under {discovery_prefix}/"]
    match = TOPIC.match(topic[len(discovery_prefix) + 1 :])
    if match is None:
        return [f"{topic}: not a discovery topic HA accepts"]
    component = match["component"]
    allowed = PLATFORM_KEYS.get(component)
    if allowed is None:
        return [f"{topic}: component {component} not checked here"]
    found += [f"unknown key {key!r}" for key in payload if key not in allowed]
    if component in ("binary_sensor", "sensor") and not payload.get("state_topic"):
        found.append("state_topic is required")
    if component == "image" and ("image_topic" in payload) == ("url_topic" in payload):
        found.append("exactly one of image_topic and url_topic")
    if component == "image" and "url_topic" in payload and "content_type" in payload:
        found.append("content_type cannot go with url_topic")
    if "availability" in payload and "availability_topic" in payload:
        found.append("availability and availability_topic are exclusive")
    for item in payload.get("availability", []):
        if "topic" not in item:
            found.append("an availability item needs a topic")
        found += [f"availability: unknown key {k!r}" for k in item if k not in AVAILABILITY_ITEM_KEYS]
    if payload.get("availability_mode", "latest") not in ("all", "any", "latest"):
        found.append("availability_mode is all, any or latest")
    device = payload.get("device")
    if device is not None:
        found += [f"device: unknown key {k!r}" for k in device if k not in DEVICE_KEYS]
        if not device.get("identifiers") and not device.get("connections"):
            found.append("device needs identifiers or connections")
    origin = payload.get("origin")
    if origin is not None:
        found += [f"origin: unknown key {k!r}" for k in origin if k not in ORIGIN_KEYS]
        if not origin.get("name"):
            found.append("origin needs a name")
    if payload.get("entity_category") not in (None, "diagnostic") and component != "image":
        found.append("entity_category must be diagnostic")
    if component == "binary_sensor" and payload.get("device_class") not in (None, *BINARY_SENSOR_CLASSES):
        found.append(f"binary_sensor device_class {payload['device_class']!r}")
    if component == "sensor":
        state_class = payload.get("state_class")
        if state_class not in (None, *STATE_CLASSES):
            found.append(f"state_class {state_class!r}")
        if state_class == "measurement_angle" and payload.get("unit_of_measurement") != "°":
            found.append("measurement_angle needs the unit °")
    for key, value in payload.items():
        if key.endswith("_topic") and key != "state_topic" and MQTT_WILDCARDS.search(str(value)):
            found.append(f"{key} is published to: no wildcards")
    if "unique_id" not in payload:
        found.append("unique_id missing: the entity could not be edited in the UI")
    return [f"{topic}: {p}" for p in found]
