"""``lookout-mqtt``: every event to an MQTT broker at least once, the streams' live figures retained,
Home Assistant discovery (topics: ``workers/mqtt_topics.py``).

Events: each zone, line and health event is queued in ``mqtt_deliveries`` in the event's own
transaction while ``mqtt_enabled``. The sink claims due rows (``FOR UPDATE SKIP LOCKED``), publishes
them in order with QoS 1 (``mqtt_qos``), each awaited until the broker acknowledged it, and marks them
published in the claim's transaction: a sink killed mid-batch leaves its rows to the next one, so an
event may come twice, always with its ``event_id``. A broker killed after acknowledging may lose what
it had not yet saved: after every (re)connect the sink publishes again what it published in the last
``mqtt_replay_s``.

It wakes on each queued event (``LISTEN lookout_mqtt``, notified by the queue's trigger) and polls
every ``mqtt_poll_s`` as a safety net. State: on every round it compares what the retained topics should say (availability, zone
occupancy, line counts, snapshot link, discovery configs) with what it last published and publishes
the difference; after a reconnect, or when Home Assistant announces itself (``<discovery
prefix>/status`` ``online``), all of it again. Its last will sets ``<prefix>/available`` ``offline``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import ssl
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import aiomqtt
import asyncpg
from minio import Minio

from core.db import POSTGRES_DOWN, run_on_pool
from core.health_events import EVENT_COLUMNS, stored_event
from core.metrics import MQTT_CONNECTED, MQTT_PENDING, MQTT_PUBLISHED
from core.retry import wait_any
from core.settings import Settings
from core.states import StreamState
from core.storage import create_s3_client, presigned_get
from workers.entrypoint import run_service
from workers.mqtt_topics import OFFLINE, ONLINE, Layout, StreamShapes, discovery, layout_of

log = logging.getLogger(__name__)

RECONNECT_MAX_S = 5.0
NOTIFY_CHANNEL = "lookout_mqtt"  # the migration's trigger notifies it on every queued event
ENDED_KEPT_S = 86_400  # a stream that ended this recently still has its topics cleared after a restart
PUBLISHED_KEPT_S = 3600  # published deliveries kept this long (for the replay), then deleted
ENDED = frozenset(state.value for state in StreamState if state.is_terminal)
_EVENT_COLUMNS = ", ".join(f"e.{name.strip()}" for name in EVENT_COLUMNS.split(","))
CLAIM = f"""
SELECT d.id AS delivery_id, {_EVENT_COLUMNS}
  FROM mqtt_deliveries d JOIN events e ON e.id = d.event_pk
 WHERE d.published_at IS NULL
 ORDER BY d.id
 LIMIT $1
   FOR UPDATE OF d SKIP LOCKED
"""
REPLAY = f"""
SELECT d.id AS delivery_id, {_EVENT_COLUMNS}
  FROM mqtt_deliveries d JOIN events e ON e.id = d.event_pk
 WHERE d.published_at >= now() - make_interval(secs => $1)
 ORDER BY d.id
"""
STREAMS = """
SELECT s.id::text AS stream_id, s.state, s.options->'zones' AS zones, s.options->'lines' AS lines,
       (SELECT e.kind FROM events e WHERE e.stream_id = s.id AND e.kind IN ('camera_offline', 'camera_online')
         ORDER BY e.id DESC LIMIT 1) AS camera,
       (SELECT e.kind FROM events e WHERE e.stream_id = s.id AND e.kind IN ('stream_failed', 'stream_recovered')
         ORDER BY e.id DESC LIMIT 1) AS failure,
       (SELECT e.s3_key FROM events e WHERE e.stream_id = s.id AND e.s3_key IS NOT NULL
         ORDER BY e.id DESC LIMIT 1) AS snapshot_key
  FROM streams s
 WHERE s.state NOT IN ('inactive', 'inactive_error') OR s.updated_at > now() - make_interval(secs => $1)
"""
FIGURES = """
SELECT stream_id::text AS stream_id, name, shape, occupancy, count_in, count_out
  FROM stream_analytics WHERE stream_id = ANY($1::uuid[])
"""


def lookout_version() -> str:
    try:
        return version("lookout")
    except PackageNotFoundError:
        return "dev"


def _names(shapes: Any) -> tuple[str, ...]:
    items = json.loads(shapes) if isinstance(shapes, str) else shapes
    return tuple(item["name"] for item in items or [])


class MqttSink:
    """Publishes events and retained state to one broker until ``run``'s stop event is set."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.pool = pool
        self.layout: Layout = layout_of(settings.mqtt_layout, settings.mqtt_topic_prefix)
        self._version = lookout_version()
        self._retained: dict[str, bytes] = {}  # what each retained topic was last set to
        self._snapshot_links: dict[str, tuple[str, bytes, float]] = {}  # stream -> key, link, made at
        self._s3: Minio = create_s3_client(settings, public=True)
        self._wake = asyncio.Event()  # an event was queued (NOTIFY), or Home Assistant came back
        self._resend = False  # Home Assistant came (back): discovery and state again
        self.connects = 0

    # --- the connection ------------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        s = self.settings
        tls = None
        if s.mqtt_tls:
            tls = ssl.create_default_context(cafile=str(s.mqtt_ca_file) if s.mqtt_ca_file else None)
        return aiomqtt.Client(
            s.mqtt_host,
            s.mqtt_port,
            username=s.mqtt_username or None,
            password=s.mqtt_secret() or None,
            identifier=s.mqtt_client_id,
            will=aiomqtt.Will(self.layout.available(), OFFLINE, qos=1, retain=True),
            tls_context=tls,
            timeout=10,
            keepalive=15,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, publish, and reconnect with backoff while the broker is away."""
        log.info(
            "mqtt sink started",
            extra={
                "broker": f"{self.settings.mqtt_host}:{self.settings.mqtt_port}",
                "layout": self.settings.mqtt_layout,
            },
        )
        wait_s = 0.5
        while not stop.is_set():
            try:
                async with self._client() as client:
                    wait_s = 0.5
                    await self._connected(client, stop)
            except aiomqtt.MqttError as err:
                log.warning(
                    "mqtt broker unavailable, events wait", extra={"error": str(err), "retry_in_s": wait_s}
                )
            except POSTGRES_DOWN as err:
                log.warning("postgres unavailable, events wait", extra={"error": str(err)})
            finally:
                MQTT_CONNECTED.set(0)
            await wait_any(stop, None, wait_s)
            wait_s = min(wait_s * 2, RECONNECT_MAX_S)
        log.info("mqtt sink stopped")

    async def _connected(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        self.connects += 1
        MQTT_CONNECTED.set(1)
        log.info("mqtt connected", extra={"connects": self.connects})
        self._retained.clear()  # the broker may have lost them: all of it again
        await client.publish(self.layout.available(), ONLINE, qos=1, retain=True)
        if self.settings.mqtt_discovery:
            await client.subscribe(f"{self.settings.mqtt_discovery_prefix}/status", qos=1)
        listener = asyncio.create_task(self._listen(client), name="mqtt-listen")
        try:
            async with self.pool.acquire() as notified:  # woken by each queued event, polls as a safety net
                await notified.add_listener(NOTIFY_CHANNEL, self._on_notify)
                try:
                    await self._replay(client)
                    synced_at = -math.inf
                    while not stop.is_set():
                        self._wake.clear()
                        if self._resend:
                            self._resend = False
                            self._retained.clear()
                            synced_at = -math.inf
                        if time.monotonic() - synced_at >= self.settings.mqtt_poll_s:  # not on every event
                            await self._sync_state(client)
                            await self._housekeep()
                            synced_at = time.monotonic()
                        sent = await self._publish_due(client)
                        if listener.done():
                            listener.result()  # the connection is gone: raise its MqttError
                        if sent < self.settings.mqtt_batch:  # all there was: wait for the next (a wake
                            # that came while publishing is still set)
                            await wait_any(stop, self._wake, self.settings.mqtt_poll_s)
                finally:
                    with contextlib.suppress(*POSTGRES_DOWN):
                        await notified.remove_listener(NOTIFY_CHANNEL, self._on_notify)
            with contextlib.suppress(aiomqtt.MqttError):  # a clean stop is not a death: no will
                await client.publish(self.layout.available(), OFFLINE, qos=1, retain=True)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await listener

    def _on_notify(self, *_args: object) -> None:
        self._wake.set()

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if message.payload == ONLINE.encode():
                log.info("home assistant is online: discovery and state sent again")
                self._resend = True
                self._wake.set()

    # --- events --------------------------------------------------------------------------------

    async def _publish(self, client: aiomqtt.Client, rows: list[asyncpg.Record]) -> None:
        for row in rows:
            message = self.layout.event(stored_event(row))
            await client.publish(message.topic, message.payload, qos=self.settings.mqtt_qos)
            MQTT_PUBLISHED.labels("event").inc()

    async def _publish_due(self, client: aiomqtt.Client) -> int:
        """Publish the due events in order and mark them; how many went out."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(CLAIM, self.settings.mqtt_batch)
            await self._publish(client, rows)
            if rows:
                await conn.execute(
                    "UPDATE mqtt_deliveries SET published_at = clock_timestamp() WHERE id = ANY($1::bigint[])",
                    [r["delivery_id"] for r in rows],
                )
        if rows:
            log.info("mqtt events published", extra={"count": len(rows)})
        return len(rows)

    async def _housekeep(self) -> None:
        """Forget what was published long ago; count what waits (the gauge)."""
        async with self.pool.acquire() as conn:
            await conn.execute(
                "DELETE FROM mqtt_deliveries WHERE published_at < now() - make_interval(secs => $1)",
                float(PUBLISHED_KEPT_S),
            )
            MQTT_PENDING.set(
                await conn.fetchval("SELECT count(*) FROM mqtt_deliveries WHERE published_at IS NULL")
            )

    async def _replay(self, client: aiomqtt.Client) -> None:
        if not self.settings.mqtt_replay_s:
            return
        rows = await self.pool.fetch(REPLAY, self.settings.mqtt_replay_s)
        await self._publish(client, rows)
        if rows:
            log.info("mqtt events published again after a connect", extra={"count": len(rows)})

    # --- retained state ------------------------------------------------------------------------

    async def _sync_state(self, client: aiomqtt.Client) -> None:
        wanted = await self._wanted_state()
        for topic, payload in wanted.items():
            if self._retained.get(topic) == payload:
                continue
            await client.publish(topic, payload, qos=1, retain=True)
            self._retained[topic] = payload
            MQTT_PUBLISHED.labels("state").inc()

    async def _wanted_state(self) -> dict[str, bytes]:
        """Every retained topic and what it should say now (b"": cleared, the stream ended)."""
        streams = await self.pool.fetch(STREAMS, float(ENDED_KEPT_S))
        figures = await self.pool.fetch(FIGURES, [r["stream_id"] for r in streams])
        layout = self.layout
        wanted: dict[str, bytes] = {}
        by_stream: dict[str, list[asyncpg.Record]] = {}
        for row in figures:
            by_stream.setdefault(row["stream_id"], []).append(row)
        # ended streams first: a topic two streams share (the Frigate layout's zones) says the running one's
        for stream in sorted(streams, key=lambda r: (r["state"] not in ENDED, r["stream_id"])):
            sid = stream["stream_id"]
            ended = stream["state"] in ENDED
            topics: dict[str, bytes] = {}
            online = (
                stream["state"] == "ml_started" and stream["camera"] != "camera_offline"
                and stream["failure"] != "stream_failed"
            )  # fmt: skip
            topics[layout.stream_availability(sid)] = (ONLINE if online else OFFLINE).encode()
            for row in by_stream.get(sid, []):
                if row["shape"] == "zone":
                    topics[layout.occupancy(sid, row["name"])] = str(row["occupancy"]).encode()
                else:
                    topics[layout.crossings(sid, row["name"], "in")] = str(row["count_in"]).encode()
                    topics[layout.crossings(sid, row["name"], "out")] = str(row["count_out"]).encode()
            if stream["snapshot_key"] is not None:
                topics[layout.snapshot(sid)] = self._snapshot_link(sid, stream["snapshot_key"])
            if self.settings.mqtt_discovery:
                shapes = StreamShapes(sid, _names(stream["zones"]), _names(stream["lines"]))
                prefix = self.settings.mqtt_discovery_prefix
                for config in discovery(layout, prefix, shapes, self._version):
                    topics[config.topic] = config.payload
            for topic, payload in topics.items():
                wanted[topic] = b"" if ended else payload
        return wanted

    def _snapshot_link(self, stream_id: str, key: str) -> bytes:
        """A link to ``key``, made once per key and again when half its life is gone (a fresh
        signature each poll would republish it each poll; an expired one shows nothing)."""
        expiry = self.settings.s3_presign_expiry_s
        made = self._snapshot_links.get(stream_id)
        if made is None or made[0] != key or time.monotonic() - made[2] > expiry / 2:
            link = presigned_get(self._s3, self.settings.s3_bucket_frames, key, expiry).encode()
            made = (key, link, time.monotonic())
            self._snapshot_links[stream_id] = made
        return made[1]


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Publish to MQTT until ``stop`` is set."""
    await run_on_pool(settings, stop, MqttSink)


def main() -> None:
    """Console script ``lookout-mqtt``."""
    run_service("mqtt", serve, metrics_port=lambda s: s.metrics_port_mqtt)
