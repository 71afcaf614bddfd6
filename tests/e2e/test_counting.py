"""Counts that are right on the real pipeline at the default 5 fps: the test camera plays the walkers
clip (deploy/camera/walkers.py: people walking known paths across a door line and through a zone)
to a stream with that line and zone; the events stored over one pass of the clip are its true events,
exactly."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from core.settings import Settings
from deploy.camera.control import TestCamera
from deploy.camera.walkers import clip_seconds, ensure_walkers_clip, first_full_pass, walkers_scene
from tests.e2e.pipeline import TERMINAL, pipeline_settings, running_pipeline
from tests.running_services import wait_for_state

pytestmark = pytest.mark.e2e


@pytest.fixture
def walkers_camera(tmp_path: Path) -> Iterator[TestCamera]:
    """A camera of this test: the clip starts from its beginning when the stream connects."""
    camera = TestCamera(log_dir=tmp_path).start(mounts=[f"walkers={ensure_walkers_clip()}"])
    yield camera
    camera.stop()


def shape(name: str, points: object) -> dict[str, object]:
    return {"name": name, "points": points, "classes": ["person"]}


async def test_a_line_and_a_zone_over_the_walkers_clip_count_its_true_events_exactly_at_5_fps(
    settings: Settings, walkers_camera: TestCamera, db_pool: asyncpg.Pool
) -> None:
    scene = walkers_scene()
    (door,), (shop,) = scene.lines, scene.zones
    truth = Counter(
        (e.kind.value, e.shape, e.direction.value if e.direction else None) for e in scene.true_events()
    )
    # every processed frame is a row: the first row says when detection began
    own = await pipeline_settings(settings, store_policy="all")
    options = {
        "fps": 5,
        "lines": [shape(door.name, [list(p) for p in door.points])],
        "zones": [shape(shop.name, [list(p) for p in shop.points])],
    }
    async with running_pipeline(own) as pipeline:
        response = await pipeline.api.post(
            "/init", json={"url": walkers_camera.url("walkers"), "options": options}
        )
        assert response.status_code == 202, response.text
        stream_id = response.json()["id"]
        view = await wait_for_state(pipeline.api, stream_id, {"ml_started", *TERMINAL}, timeout_s=90)
        assert view["state"] == "ml_started", view
        # the clip loops from when the stream connected (its time 0): count one whole pass of it
        playing_since = walkers_camera.started_playing_at("walkers")
        assert playing_since is not None
        detecting_since = await db_pool.fetchval(
            "SELECT min(capture_time) FROM detections WHERE stream_id = $1", stream_id
        )
        length = clip_seconds(scene)
        first = datetime.fromtimestamp(playing_since, UTC) + timedelta(
            seconds=length * first_full_pass(scene, playing_since, detecting_since.timestamp())
        )
        end = first + timedelta(seconds=length)
        deadline = time.monotonic() + 2 * length + 60
        while (
            await db_pool.fetchval("SELECT max(capture_time) FROM detections WHERE stream_id = $1", stream_id)
        ) < end:
            assert time.monotonic() < deadline, "the stream did not process a whole pass of the clip"
            await asyncio.sleep(1)
        rows = await db_pool.fetch(
            "SELECT kind, zone, direction, track_id FROM events"
            " WHERE stream_id = $1 AND occurred_at >= $2 AND occurred_at < $3",
            stream_id,
            first,
            end,
        )
        assert (await pipeline.api.post("/shutdown", json={"id": stream_id})).status_code == 202
        await wait_for_state(pipeline.api, stream_id, TERMINAL, timeout_s=30)
    counted = Counter((r["kind"], r["zone"], r["direction"]) for r in rows)
    assert counted == truth, f"counted {dict(counted)}, true {dict(truth)}"
    crossings = [r["track_id"] for r in rows if r["kind"] == "crossed"]
    assert len(set(crossings)) == len(crossings), "each walker crosses once, each on a track of its own"
