"""``lookout-mqtt`` on a real Mosquitto and a real Postgres, read by a real MQTT client: events at least
once with their ids, retained occupancy, line counts and availability that follow the database, Home
Assistant discovery that HA's schema accepts, the last will, both layouts, and kill -9 of the sink
and of the broker in the middle of a stream of events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from pydantic import ValidationError

from core.db import create_pool
from core.health_events import HealthEvent, HealthKind, health_event_id, store_health_event
from core.settings import Settings
from core.timeouts import within
from tests.conftest import make_settings
from tests.mqtt_broker import PASSWORD, USER, Broker, certificates, sink_process, subscribed
from tests.observing import eventually
from tests.workers.ha_discovery import problems
from workers.mqtt import MqttSink

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

ZONES = [{"name": "door", "points": [[0, 0], [0.5, 0], [0.5, 1]]}]
LINES = [{"name": "gate way", "points": [[0.2, 0.5], [0.8, 0.5]]}]


@pytest.fixture
async def sink_settings(private_database: str, s3_endpoint: str, broker: Broker, tmp_path: Path) -> Settings:
    return make_settings(
        database_url=private_database,
        s3_endpoint=s3_endpoint,
        data_dir=tmp_path / "data",
        mqtt_enabled=True,
        mqtt_port=broker.port,
        mqtt_username=USER,
        mqtt_password=PASSWORD,
        mqtt_poll_s=0.1,
        mqtt_replay_s=5.0,
        metrics_port_mqtt=0,
    )


@pytest.fixture
async def pool(sink_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    created = await create_pool(sink_settings)
    yield created
    await created.close()


async def new_stream(pool: asyncpg.Pool, state: str = "ml_started") -> str:
    stream_id = uuid.uuid4()
    await pool.execute(
        "INSERT INTO streams (id, url_redacted, url_full, options, state) VALUES ($1, 'rtsp://h/x', 'sealed', $2, $3)",
        stream_id,
        {"zones": ZONES, "lines": LINES},
        state,
    )
    return str(stream_id)


async def zone_event(pool: asyncpg.Pool, stream_id: str, seq: int, kind: str = "entered") -> str:
    """A zone event as the detection process stores it: the row and its MQTT delivery together."""
    event_id = f"{stream_id}:{seq}:{kind}:door:7"
    async with pool.acquire() as conn, conn.transaction():
        pk = await conn.fetchval(
            "INSERT INTO events (event_id, stream_id, frame_seq, kind, zone, track_id, class_name, confidence,"
            " occurred_at, s3_key) VALUES ($1, $2, $3, $4, 'door', 7, 'person', 0.9, now(), $5) RETURNING id",
            event_id, uuid.UUID(stream_id), seq, kind, f"{stream_id}/frames/{seq}.jpg",
        )  # fmt: skip
        await conn.execute("INSERT INTO mqtt_deliveries (event_pk) VALUES ($1)", pk)
    return event_id


async def set_figures(pool: asyncpg.Pool, stream_id: str, occupancy: int, crossed_in: int) -> None:
    await pool.execute(
        "INSERT INTO stream_analytics (stream_id, name, shape, occupancy) VALUES ($1, 'door', 'zone', $2)"
        " ON CONFLICT (stream_id, name) DO UPDATE SET occupancy = $2",
        uuid.UUID(stream_id),
        occupancy,
    )
    await pool.execute(
        "INSERT INTO stream_analytics (stream_id, name, shape, count_in) VALUES ($1, 'gate way', 'line', $2)"
        " ON CONFLICT (stream_id, name) DO UPDATE SET count_in = $2",
        uuid.UUID(stream_id),
        crossed_in,
    )


def health(stream_id: str, kind: HealthKind, at: datetime, since: datetime | None = None) -> HealthEvent:
    return HealthEvent(
        event_id=health_event_id(stream_id, kind, since or at), stream_id=stream_id, kind=kind,
        occurred_at=at, since=since, downtime_s=(at - since).total_seconds() if since else None,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def sink_in_process(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[MqttSink]:
    sink = MqttSink(settings, pool)
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    yield sink
    stop.set()
    await within(task, 15)


def event_ids(messages: list[bytes]) -> list[str]:
    return [json.loads(m)["event_id"] for m in messages]


async def test_events_state_and_discovery_reach_a_client_and_follow_the_database(
    sink_settings: Settings, pool: asyncpg.Pool, broker: Broker
) -> None:
    stream_id = await new_stream(pool)
    ended_id = await new_stream(pool, state="inactive")
    await set_figures(pool, stream_id, occupancy=2, crossed_in=5)
    entered = await zone_event(pool, stream_id, 10)
    async with subscribed(broker.port) as client, sink_in_process(sink_settings, pool):
        p = f"lookout/{stream_id}"
        await eventually(lambda: client.latest(f"{p}/zone/door/occupancy") == b"2", timeout_s=10)
        assert client.latest("lookout/available") == b"online"
        assert client.latest(f"{p}/availability") == b"online"
        assert client.latest(f"{p}/line/gate way/in") == b"5"
        assert client.latest(f"{p}/line/gate way/out") == b"0"
        await eventually(lambda: client.on(f"{p}/events"), timeout_s=10)
        assert event_ids([m.payload for m in client.on(f"{p}/events")]) == [entered]
        snapshot = client.latest(f"{p}/snapshot")
        assert snapshot is not None and f"{stream_id}/frames/10.jpg" in snapshot.decode()

        # occupancy follows the zone; a camera going offline takes the stream's availability with it
        await set_figures(pool, stream_id, occupancy=0, crossed_in=6)
        await eventually(lambda: client.latest(f"{p}/zone/door/occupancy") == b"0", timeout_s=5)
        await eventually(lambda: client.latest(f"{p}/line/gate way/in") == b"6", timeout_s=5)
        now = datetime.now(UTC)
        offline = health(stream_id, HealthKind.CAMERA_OFFLINE, now, since=now - timedelta(seconds=10))
        assert await store_health_event(pool, sink_settings, offline)
        assert not await store_health_event(pool, sink_settings, offline), "stored twice"
        await eventually(lambda: client.latest(f"{p}/availability") == b"offline", timeout_s=5)
        events = [json.loads(m.payload) for m in client.on(f"{p}/events")]
        assert [e["kind"] for e in events] == ["entered", "camera_offline"]
        assert events[1]["event_id"] == offline.event_id and events[1]["since"] is not None

        # discovery: one device per running stream, every config as HA's schema wants it
        configs = {m.topic: m.payload for m in client.on("homeassistant/") if m.payload}
        mine = {t: json.loads(v) for t, v in configs.items() if f"lookout_{stream_id}" in t}
        components = Counter(t.split("/")[1] for t in mine)
        assert components == {"binary_sensor": 1, "sensor": 3, "image": 1}, sorted(mine)
        for topic, payload in mine.items():
            assert problems(topic, payload) == [], payload
        camera = next(v for t, v in mine.items() if "/binary_sensor/" in t)
        assert camera["device_class"] == "connectivity" and camera["state_topic"] == f"{p}/availability"
        assert not any(f"lookout_{ended_id}" in t for t in configs), "an ended stream has no entities"

        # the stream ends: its entities go and its retained topics are cleared
        await pool.execute("UPDATE streams SET state = 'inactive' WHERE id = $1", uuid.UUID(stream_id))
        await eventually(lambda: client.latest(f"{p}/zone/door/occupancy") == b"", timeout_s=5)
        for topic in mine:
            assert client.latest(topic) == b""


async def test_the_frigate_layout_keeps_frigate_topics(
    sink_settings: Settings, pool: asyncpg.Pool, broker: Broker
) -> None:
    frigate = sink_settings.model_copy(update={"mqtt_layout": "frigate", "mqtt_topic_prefix": "frigate"})
    ended = await new_stream(pool, state="inactive")  # its zone has the same name: Frigate's topic is shared
    await set_figures(pool, ended, occupancy=9, crossed_in=0)
    stream_id = await new_stream(pool)
    await set_figures(pool, stream_id, occupancy=3, crossed_in=1)
    entered = await zone_event(pool, stream_id, 1)
    left = await zone_event(pool, stream_id, 2, kind="left")
    async with subscribed(broker.port, "frigate/#") as client, sink_in_process(frigate, pool):
        await eventually(lambda: len(client.on("frigate/events")) == 2, timeout_s=10)
        new, end = (m.json() for m in client.on("frigate/events"))
        assert (new["type"], end["type"]) == ("new", "end")
        assert new["after"]["camera"] == stream_id and new["after"]["label"] == "person"
        assert new["after"]["entered_zones"] == ["door"] and end["after"]["current_zones"] == []
        assert [new["after"]["lookout_event_id"], end["after"]["lookout_event_id"]] == [entered, left]
        assert new["after"]["id"] == end["after"]["id"], "Frigate's id names the tracked object"
        assert client.latest("frigate/available") == b"online"
        assert client.latest("frigate/door/all") == b"3", "the running stream's value, not the ended one's"
        await asyncio.sleep(1)  # several polls: the value holds
        assert [m.payload for m in client.on("frigate/door/all")] == [b"3"]
        assert client.latest(f"frigate/{stream_id}/status/detect") == b"online"


async def test_the_sink_says_offline_when_stopped_and_its_last_will_when_killed(
    sink_settings: Settings, pool: asyncpg.Pool, broker: Broker, tmp_path: Path
) -> None:
    async with subscribed(broker.port, "lookout/available") as client:
        sink = sink_process(sink_settings, tmp_path / "mqtt.log")
        await eventually(lambda: client.latest("lookout/available") == b"online", timeout_s=30)
        sink.send_signal(signal.SIGTERM)  # a clean stop says offline itself and exits 0
        assert await asyncio.to_thread(sink.wait, 20) == 0
        assert client.latest("lookout/available") == b"offline"
        sink = sink_process(sink_settings, tmp_path / "mqtt.log")
        try:
            await eventually(lambda: client.latest("lookout/available") == b"online", timeout_s=30)
            os.kill(sink.pid, signal.SIGKILL)
            sink.wait()
            # the broker sends the will when the keepalive (15 s) runs out or at once on a closed socket
            await eventually(lambda: client.latest("lookout/available") == b"offline", timeout_s=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                sink.kill()
            sink.wait()


async def test_kill_9_of_the_sink_and_of_the_broker_mid_stream_loses_no_event_and_renames_none(
    sink_settings: Settings, pool: asyncpg.Pool, broker: Broker, tmp_path: Path
) -> None:
    stream_id = await new_stream(pool)
    stored: list[str] = []

    async def keep_storing(count: int) -> None:
        start = datetime.now(UTC)
        for i in range(count):
            at = start + timedelta(seconds=i)
            kind = HealthKind.SERVICE_RESTARTED
            event = HealthEvent(
                event_id=health_event_id(stream_id, kind, at, "ml"), stream_id=stream_id, kind=kind,
                occurred_at=at, reason=f"restart {i}",
            )  # fmt: skip
            assert await store_health_event(pool, sink_settings, event)
            stored.append(event.event_id)
            await asyncio.sleep(0.05)

    log_path = tmp_path / "mqtt.log"
    async with subscribed(broker.port, f"lookout/{stream_id}/events", identifier="kill-test") as client:
        sink = sink_process(sink_settings, log_path)
        try:
            storing = asyncio.create_task(keep_storing(160))
            await eventually(lambda: len(stored) >= 30 and client.on("lookout/"), timeout_s=30)
            os.kill(sink.pid, signal.SIGKILL)  # the sink, mid-stream
            sink.wait()
            await eventually(lambda: len(stored) >= 60, timeout_s=30)
            sink = sink_process(sink_settings, log_path)
            await eventually(lambda: len(stored) >= 90, timeout_s=30)
            broker.kill()  # the broker, mid-stream
            await eventually(lambda: len(stored) >= 120, timeout_s=30)
            broker.start()
            await storing

            def all_received() -> bool:
                return set(event_ids([m.payload for m in client.messages])) >= set(stored)

            await eventually(all_received, timeout_s=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                sink.kill()
            sink.wait()
    received = event_ids([m.payload for m in client.messages])
    assert set(received) == set(stored), "an id was received that no stored event has"
    by_id: dict[str, set[bytes]] = {}
    for message in client.messages:
        by_id.setdefault(json.loads(message.payload)["event_id"], set()).add(message.payload)
    assert all(len(copies) == 1 for copies in by_id.values()), "a copy differed from its first delivery"
    pending = await pool.fetchval("SELECT count(*) FROM mqtt_deliveries WHERE published_at IS NULL")
    assert pending == 0
    duplicates = len(received) - len(set(received))
    log.info("%d events, %d deliveries (%d again, same id), %d connects", len(stored), len(received), duplicates,
             client.connects)  # fmt: skip


async def test_over_tls_the_sink_checks_the_broker_against_its_ca(
    pool: asyncpg.Pool, sink_settings: Settings, tmp_path: Path
) -> None:
    ca, cert, key = certificates(tmp_path / "tls")
    secure = Broker(tmp_path / "mqtt-tls", tls=(cert, key)).start()
    try:
        stream_id = await new_stream(pool)
        entered = await zone_event(pool, stream_id, 1)
        trusting = ssl.create_default_context(cafile=str(ca))
        over_tls = sink_settings.model_copy(
            update={"mqtt_port": secure.port, "mqtt_tls": True, "mqtt_ca_file": ca}
        )
        async with subscribed(secure.port, f"lookout/{stream_id}/events", tls=trusting) as client:
            async with sink_in_process(over_tls, pool):
                await eventually(lambda: client.on("lookout/"), timeout_s=15)
            assert event_ids([m.payload for m in client.messages]) == [entered]
            # a sink that does not trust the broker's certificate connects not, and publishes nothing
            await zone_event(pool, stream_id, 2)
            distrusting = over_tls.model_copy(update={"mqtt_ca_file": None})
            async with sink_in_process(distrusting, pool) as sink:
                await asyncio.sleep(3)
                assert sink.connects == 0
            assert len(client.messages) == 1
    finally:
        secure.stop()


@pytest.mark.parametrize("prefix", ["a/+/b", "lookout/#", "a//b", "", "$SYS/lookout", "/lookout"])
def test_a_topic_prefix_mqtt_cannot_publish_under_is_refused(prefix: str) -> None:
    with pytest.raises(ValidationError, match="MQTT topic prefix"):
        make_settings(mqtt_topic_prefix=prefix)
    with pytest.raises(ValidationError, match="MQTT topic prefix"):
        make_settings(mqtt_discovery_prefix=prefix)
    assert make_settings(mqtt_topic_prefix="site-1/lookout").mqtt_topic_prefix == "site-1/lookout"
