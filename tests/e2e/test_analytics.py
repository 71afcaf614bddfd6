"""Tracking, zones, lines, events, the live feed and webhooks on the real pipeline: the test camera
plays the demo clip (people walking) to a stream with a line down the middle of the picture.

One stream runs for the whole module. It starts with the line only; a ``PATCH`` adds a zone while
it runs. Its webhook receiver (a real local HTTP server) is down for the first seconds, so the
first deliveries fail and are retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg
import httpx
import pytest

from core.settings import Settings
from deploy import servers
from deploy.camera.control import TestCamera
from tests.e2e.pipeline import TERMINAL, Pipeline, pipeline_settings, running_pipeline, served_api
from tests.running_services import wait_for_state
from workers.ml.store import OPEN_VISITS
from workers.webhooks import SIGNATURE_HEADER, WebhookDeliverer, verify

pytestmark = pytest.mark.e2e

DOOR = {"name": "door", "points": [[0.5, 0.05], [0.5, 0.95]]}
LEFT_SIDE = {
    "name": "left side",
    "points": [[0.0, 0.3], [0.4, 0.3], [0.4, 1.0], [0.0, 1.0]],
    "classes": ["person"],
}
WINDOW_S = 75.0


@dataclass
class Receiver:
    """A webhook receiver: records each request's headers and body; answers 204."""

    port: int
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True, name="webhook-receiver").start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def event_ids(self) -> set[str]:
        return {json.loads(body)["event_id"] for _h, body in self.received}


@dataclass
class Running:
    pipeline: Pipeline
    stream_id: str
    webhook_secret: str
    receiver: Receiver
    base_url: str  # the API behind a real HTTP server, for the live feed
    feed_first: list[dict[str, Any]]  # what the live feed delivered before the zone was added
    patched_at: float

    @property
    def api(self) -> httpx.AsyncClient:
        return self.pipeline.api


async def events_of(db: asyncpg.Pool, stream_id: str) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM events WHERE stream_id = $1::uuid ORDER BY id", stream_id)


async def read_feed(
    base_url: str, headers: dict[str, str], params: dict[str, str], count: int, timeout_s: float
) -> list[dict[str, Any]]:
    """The first ``count`` events of ``GET /events/stream`` (fewer when ``timeout_s`` passes)."""
    got: list[dict[str, Any]] = []
    with contextlib.suppress(TimeoutError):
        async with (
            asyncio.timeout(timeout_s),
            httpx.AsyncClient(base_url=base_url, timeout=None) as client,
            client.stream("GET", "/events/stream", params=params, headers=headers) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            message: dict[str, str] = {}
            async for line in response.aiter_lines():
                if line.startswith(("id:", "event:", "data:")):
                    name, _, value = line.partition(":")
                    message[name] = value.strip()
                elif line == "" and "data" in message:
                    got.append(
                        {
                            "id": int(message["id"]),
                            "event": message["event"],
                            **json.loads(message["data"]),
                        }
                    )
                    message = {}
                    if len(got) >= count:
                        break
    return got


@pytest.fixture(scope="module")
async def running(settings: Settings, camera: TestCamera, db_pool: asyncpg.Pool) -> AsyncIterator[Running]:
    own = await pipeline_settings(
        settings,
        heartbeat_interval_s=1.0,
        webhook_retry_first_s=0.5,
        webhook_retry_max_s=2.0,
        webhook_max_attempts=100,
        webhook_poll_s=0.2,
    )
    receiver = Receiver(servers.free_port())
    stop = asyncio.Event()
    async with running_pipeline(own) as pipeline, served_api(own) as base_url:
        deliverer = asyncio.create_task(WebhookDeliverer(own, db_pool).run(stop))
        options = {
            "fps": 5,
            "imgsz": 320,
            "lines": [DOOR],
            "webhook_url": f"http://127.0.0.1:{receiver.port}/hook",
        }
        response = await pipeline.api.post("/init", json={"url": camera.url("cam1"), "options": options})
        assert response.status_code == 202, response.text
        stream_id, secret = response.json()["id"], response.json()["webhook_secret"]
        assert secret and secret.startswith("whsec_")
        # the secret is shown once: never again
        assert (await pipeline.api.get(f"/state/{stream_id}")).json()["webhook_secret"] is None
        view = await wait_for_state(pipeline.api, stream_id, {"ml_started", *TERMINAL}, timeout_s=90)
        assert view["state"] == "ml_started", view
        auth = {"Authorization": pipeline.api.headers["Authorization"]}
        # the live feed from the start; the receiver is down until it has delivered two events
        feed_first = await read_feed(base_url, auth, {"id": stream_id}, count=2, timeout_s=40)
        receiver.start()
        patch = await pipeline.api.patch(f"/streams/{stream_id}", json={"options": {"zones": [LEFT_SIDE]}})
        assert patch.status_code == 200, patch.text
        try:
            yield Running(pipeline, stream_id, secret, receiver, base_url, feed_first, time.time())
        finally:
            await pipeline.api.post("/shutdown", json={"id": stream_id})
            await wait_for_state(pipeline.api, stream_id, TERMINAL, timeout_s=30)
            stop.set()
            await deliverer
            receiver.stop()


async def wait_for_events(
    db: asyncpg.Pool, stream_id: str, done: Any, timeout_s: float = WINDOW_S
) -> list[asyncpg.Record]:
    deadline = time.monotonic() + timeout_s
    rows: list[asyncpg.Record] = []
    while time.monotonic() < deadline:
        rows = await events_of(db, stream_id)
        if done(rows):
            return rows
        await asyncio.sleep(1.0)
    kinds = sorted({(r["kind"], r["zone"], r["direction"]) for r in rows})
    raise AssertionError(f"not seen after {timeout_s}s; {len(rows)} events: {kinds}")


async def test_a_line_across_the_path_counts_crossings_in_both_directions(
    running: Running, db_pool: asyncpg.Pool
) -> None:
    def both_ways(rows: list[asyncpg.Record]) -> bool:
        return {r["direction"] for r in rows if r["kind"] == "crossed"} == {"in", "out"}

    rows = await wait_for_events(db_pool, running.stream_id, both_ways)
    crossed = [r for r in rows if r["kind"] == "crossed"]
    assert all(r["zone"] == "door" and r["class_name"] == "person" for r in crossed)
    # plausible: the clip shows a few people a minute passing the middle, not a flicker per frame
    elapsed = (crossed[-1]["occurred_at"] - crossed[0]["occurred_at"]).total_seconds()
    assert len(crossed) <= 4 + elapsed, [(r["track_id"], r["direction"]) for r in crossed]
    # every event shows its annotated frame, stored with that frame's detection row
    frames = await db_pool.fetch(
        "SELECT frame_seq, s3_key, objects FROM detections WHERE stream_id = $1::uuid AND frame_seq = ANY($2)",
        running.stream_id,
        [r["frame_seq"] for r in crossed],
    )
    assert {f["frame_seq"] for f in frames} == {r["frame_seq"] for r in crossed}
    assert {f["s3_key"] for f in frames} == {r["s3_key"] for r in crossed}
    # the crossing object is in its frame's objects, with its track id
    tracks = {(f["frame_seq"], o.get("track_id")) for f in frames for o in f["objects"]}
    assert all((r["frame_seq"], r["track_id"]) in tracks for r in crossed)

    # /state has the line's counts, as stored
    view = (await running.api.get(f"/state/{running.stream_id}")).json()
    counts = await db_pool.fetch(
        "SELECT direction, count(*) AS n FROM events WHERE stream_id = $1::uuid AND kind = 'crossed' GROUP BY 1",
        running.stream_id,
    )
    door = next(line for line in view["analytics"]["lines"] if line["name"] == "door")
    stored = {c["direction"]: c["n"] for c in counts}
    assert (
        door["in"] >= stored["in"] - 2 and door["out"] >= stored["out"] - 2
    )  # events may land between reads
    assert door["in"] <= stored["in"] + 2 and door["out"] <= stored["out"] + 2


async def test_a_zone_added_while_running_sees_entered_and_left_pairs(
    running: Running, db_pool: asyncpg.Pool
) -> None:
    def a_pair(rows: list[asyncpg.Record]) -> bool:
        zone = [r for r in rows if r["zone"] == "left side"]
        return any(r["kind"] == "left" for r in zone)

    rows = await wait_for_events(db_pool, running.stream_id, a_pair)
    zone = [r for r in rows if r["zone"] == "left side"]
    assert zone, "the PATCH reached the detection process: the new zone has events"
    entered = {r["track_id"]: r["id"] for r in zone if r["kind"] == "entered"}
    for left in (r for r in zone if r["kind"] == "left"):
        assert left["track_id"] in entered and entered[left["track_id"]] < left["id"], (
            "left before it entered"
        )
        assert left["dwell_s"] is not None and left["dwell_s"] >= 0
    view = (await running.api.get(f"/state/{running.stream_id}")).json()
    figures = next(z for z in view["analytics"]["zones"] if z["name"] == "left side")
    assert figures["entered"] >= figures["left"] >= 1
    assert 0 <= figures["occupancy"] <= figures["entered"]
    # GET /events filters by zone and kind, newest first, with a link to the frame
    page = (
        await running.api.get(
            "/events", params={"id": running.stream_id, "zone": "left side", "kind": "left"}
        )
    ).json()
    assert page["items"] and all(e["zone"] == "left side" and e["kind"] == "left" for e in page["items"])
    assert [e["id"] for e in page["items"]] == sorted((e["id"] for e in page["items"]), reverse=True)
    assert page["items"][0]["image_url"].startswith("http")


async def test_the_live_feed_delivers_events_and_resumes_after_a_reconnect_from_last_event_id(
    running: Running, db_pool: asyncpg.Pool
) -> None:
    first = running.feed_first
    assert len(first) == 2, "the live feed delivered events as they happened"
    stored = [r["id"] for r in await events_of(db_pool, running.stream_id)]
    assert [e["id"] for e in first] == [i for i in stored if i <= first[-1]["id"]][-2:]
    # reconnect with the id of the last one seen: the feed goes on right after it, nothing twice
    auth = {"Authorization": running.api.headers["Authorization"], "Last-Event-ID": str(first[-1]["id"])}
    await wait_for_events(
        db_pool, running.stream_id, lambda rows: len(rows) >= stored.index(first[-1]["id"]) + 4
    )
    resumed = await read_feed(running.base_url, auth, {"id": running.stream_id}, count=3, timeout_s=30)
    stored = [r["id"] for r in await events_of(db_pool, running.stream_id)]
    after = [i for i in stored if i > first[-1]["id"]]
    assert [e["id"] for e in resumed] == after[:3]
    assert all(e["stream_id"] == running.stream_id and e["event"] == e["kind"] for e in resumed)


async def test_the_webhook_receiver_gets_every_event_signed_even_after_it_was_down(
    running: Running, db_pool: asyncpg.Pool
) -> None:
    await wait_for_events(db_pool, running.stream_id, lambda rows: len(rows) >= 4)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stored = {r["event_id"] for r in await events_of(db_pool, running.stream_id)}
        if stored <= running.receiver.event_ids():
            break
        await asyncio.sleep(0.5)
    assert stored <= running.receiver.event_ids(), (
        f"{len(stored - running.receiver.event_ids())} not delivered"
    )
    for headers, body in running.receiver.received:
        assert verify(running.webhook_secret, body, headers[SIGNATURE_HEADER.lower()]), "bad signature"
        assert headers["x-lookout-event-id"] == json.loads(body)["event_id"]
    headers, body = running.receiver.received[0]
    assert not verify("whsec_other", body, headers[SIGNATURE_HEADER.lower()])
    # the first events came while the receiver was down: tried more than once, then delivered
    retried = await db_pool.fetchval(
        "SELECT count(*) FROM webhook_deliveries WHERE stream_id = $1::uuid AND attempts > 1 AND status = 'delivered'",
        running.stream_id,
    )
    assert retried >= 1
    assert not await db_pool.fetchval(
        "SELECT count(*) FROM webhook_deliveries WHERE stream_id = $1::uuid AND status = 'dead'",
        running.stream_id,
    )


async def test_a_detection_process_killed_mid_stream_comes_back_and_its_events_go_on(
    running: Running, db_pool: asyncpg.Pool
) -> None:
    """Runs last: kill -9 of the stream's detection process while its line and zone are watched."""
    old_pid = running.pipeline.stream_pids(running.stream_id)["ml"]
    os.kill(old_pid, signal.SIGKILL)
    killed_at = await db_pool.fetchval("SELECT now()")
    last_track = await db_pool.fetchval(
        "SELECT coalesce(max(track_id), 0) FROM events WHERE stream_id = $1::uuid", running.stream_id
    )
    open_at_kill = {
        (r["zone"], r["track_id"])
        for r in await db_pool.fetch(OPEN_VISITS.replace("%s", "$1::uuid"), running.stream_id)
    }

    def new_events(rows: list[asyncpg.Record]) -> bool:  # the new process's (the restart's told first)
        return any(r["created_at"] > killed_at and r["zone"] is not None for r in rows)

    await wait_for_events(db_pool, running.stream_id, new_events)
    stored_after = await db_pool.fetch(
        "SELECT kind, zone, track_id, cause, service FROM events WHERE stream_id = $1::uuid AND created_at > $2",
        running.stream_id,
        killed_at,
    )
    # the lifecycle told the restart as a health event; the rest are the zone's and the line's
    health = [r for r in stored_after if r["zone"] is None]
    assert [(r["kind"], r["service"]) for r in health] == [("service_restarted", "ml")], health
    after = [r for r in stored_after if r["zone"] is not None]
    # the visits the killed process left open are closed, saying why; new tracks take new ids
    closed = {(r["zone"], r["track_id"]) for r in after if r["cause"] == "restart"}
    assert closed == open_at_kill
    assert all(r["kind"] == "left" for r in after if r["cause"] == "restart")
    assert all(r["track_id"] > last_track for r in after if r["cause"] is None)
    assert running.pipeline.stream_pids(running.stream_id)["ml"] != old_pid
    view = (await running.api.get(f"/state/{running.stream_id}")).json()
    assert view["state"] == "ml_started"
    # the new process tracks afresh and writes the zone's occupancy again: still within its counts
    zone = next(z for z in view["analytics"]["zones"] if z["name"] == "left side")
    assert 0 <= zone["occupancy"] <= zone["entered"]
    ids = await db_pool.fetch("SELECT event_id FROM events WHERE stream_id = $1::uuid", running.stream_id)
    assert len({r["event_id"] for r in ids}) == len(ids)
