"""Health events end to end: the real runner and ML as processes, the real camera, Mosquitto with a real
MQTT client, the live SSE feed and a webhook receiver. A camera killed and brought back is told as
``camera_offline`` then ``camera_online`` on all three, once each; the zone's occupancy topic follows
what the detection process stores."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from pydantic import SecretStr

from core.settings import Settings
from deploy import servers
from deploy.camera.control import TestCamera
from tests.e2e.healing import healing_pipeline
from tests.e2e.pipeline import TERMINAL, served_api
from tests.e2e.test_analytics import Receiver
from tests.mqtt_broker import PASSWORD, USER, Broker, subscribed
from tests.observing import eventually
from tests.running_services import wait_for_state
from workers.mqtt import MqttSink
from workers.webhooks import WebhookDeliverer

pytestmark = pytest.mark.e2e

EVERYWHERE = {
    "name": "floor",
    "points": [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]],
    "classes": ["person"],
}
CAMERA_KINDS = ("camera_offline", "camera_online")


async def follow_feed(
    base_url: str, headers: dict[str, str], stream_id: str, into: list[dict[str, Any]]
) -> None:
    """Every event of the live feed for ``stream_id``, appended to ``into`` until cancelled."""
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=None) as client,
        client.stream("GET", "/events/stream", params={"id": stream_id}, headers=headers) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                into.append(json.loads(line.partition(":")[2]))


@contextlib.asynccontextmanager
async def running_in_process(*runners: Any) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(runner.run(stop)) for runner in runners]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def kinds_of(events: list[dict[str, Any]], kinds: tuple[str, ...] = CAMERA_KINDS) -> list[str]:
    return [e["kind"] for e in events if e["kind"] in kinds]


async def test_a_camera_killed_and_back_is_told_once_each_on_mqtt_sse_and_webhook_and_occupancy_follows(
    settings: Settings,
    db_pool: asyncpg.Pool,
    broker: Broker,
    own_camera: TestCamera,
    tmp_path: Path,
) -> None:
    receiver = Receiver(servers.free_port())
    receiver.start()
    mqtt: dict[str, Any] = {
        "mqtt_enabled": True, "mqtt_port": broker.port, "mqtt_username": USER, "mqtt_password": SecretStr(PASSWORD),
        "mqtt_poll_s": 0.2, "health_debounce_s": 2.0, "webhook_poll_s": 0.2,
    }  # fmt: skip
    async with (
        healing_pipeline(settings, db_pool, tmp_path / "logs", **mqtt) as healing,
        served_api(healing.settings) as base_url,
        subscribed(broker.port, "lookout/#") as client,
        running_in_process(MqttSink(healing.settings, db_pool), WebhookDeliverer(healing.settings, db_pool)),
    ):
        options = {
            "fps": 5, "imgsz": 320, "zones": [EVERYWHERE],
            "webhook_url": f"http://127.0.0.1:{receiver.port}/hook",
        }  # fmt: skip
        response = await healing.api.post("/init", json={"url": own_camera.url("cam1"), "options": options})
        assert response.status_code == 202, response.text
        sid = response.json()["id"]
        view = await wait_for_state(healing.api, sid, {"ml_started", *TERMINAL}, timeout_s=120)
        assert view["state"] == "ml_started", view
        feed: list[dict[str, Any]] = []
        auth = {"Authorization": healing.api.headers["Authorization"]}
        reader = asyncio.create_task(follow_feed(base_url, auth, sid, feed))
        p = f"lookout/{sid}"
        try:
            # the zone's occupancy on MQTT follows what the detection process stores
            occupancy_topic = f"{p}/zone/floor/occupancy"

            async def occupancy_followed() -> bool:
                stored = await db_pool.fetchval(
                    "SELECT occupancy FROM stream_analytics WHERE stream_id = $1::uuid AND name = 'floor'",
                    sid,
                )
                seen = {m.payload for m in client.on(occupancy_topic)}
                return (
                    stored is not None
                    and len(seen) >= 2
                    and client.latest(occupancy_topic) == str(stored).encode()
                )

            await eventually(occupancy_followed, timeout_s=90, interval_s=0.3)
            await eventually(lambda: client.latest(f"{p}/availability") == b"online", timeout_s=15)

            own_camera.kill()
            await eventually(lambda: kinds_of([m.json() for m in client.on(f"{p}/events")]), timeout_s=60)
            await eventually(lambda: client.latest(f"{p}/availability") == b"offline", timeout_s=10)
            own_camera.start(port=own_camera.port, mounts=["cam1"])
            await eventually(
                lambda: "camera_online" in kinds_of([m.json() for m in client.on(f"{p}/events")]),
                timeout_s=90,
            )
            await eventually(lambda: client.latest(f"{p}/availability") == b"online", timeout_s=10)

            def webhook_events() -> list[dict[str, Any]]:
                return [json.loads(body) for _headers, body in receiver.received]

            await eventually(
                lambda: kinds_of(feed) == list(CAMERA_KINDS), timeout_s=15, what=lambda: kinds_of(feed)
            )
            await eventually(
                lambda: kinds_of(webhook_events()) == list(CAMERA_KINDS),
                timeout_s=30,
                what=lambda: kinds_of(webhook_events()),
            )
            await asyncio.sleep(3)  # nothing more comes
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            receiver.stop()

        mqtt_events = [m.json() for m in client.on(f"{p}/events")]
        for delivered in (mqtt_events, feed, webhook_events()):
            assert kinds_of(delivered) == ["camera_offline", "camera_online"], kinds_of(delivered)
        offline, online = (e for e in mqtt_events if e["kind"] in CAMERA_KINDS)
        assert online["since"] == offline["since"] and online["downtime_s"] > 0
        ids = {e["event_id"] for e in mqtt_events if e["kind"] in CAMERA_KINDS}
        assert ids == {e["event_id"] for e in feed if e["kind"] in CAMERA_KINDS}
        assert ids == {e["event_id"] for e in webhook_events() if e["kind"] in CAMERA_KINDS}
        stored = await db_pool.fetch(
            "SELECT kind FROM events WHERE stream_id = $1::uuid AND kind IN ('camera_offline', 'camera_online')",
            sid,
        )
        assert sorted(r["kind"] for r in stored) == ["camera_offline", "camera_online"]
        zone_on_mqtt = [e for e in mqtt_events if e["kind"] in ("entered", "left")]
        assert zone_on_mqtt, "the zone's events reached MQTT too (queued by the detection process)"

        view, _took = await healing.shut_down(sid)
        assert view["state"] == "inactive", view
        await eventually(lambda: client.latest(occupancy_topic) == b"", timeout_s=10)
