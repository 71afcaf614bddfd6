"""Each store policy stores what it says, on the real pipeline: four streams read the test camera's
still scene (people standing, nothing moves) for 60 s at 5 fps, one per policy. ``all`` and
``objects`` store a frame for each of the ~300 processed, ``changes`` a handful (the first, and one
per ``store_every_s`` while the same people stay), ``events`` only the frames with an event (a zone
over the whole frame: the first entries). What is not stored is counted, in the health figures."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import pytest

from core.settings import Settings
from deploy.camera.control import STILL_MOUNT, TestCamera
from tests.e2e.pipeline import TERMINAL, pipeline_settings, running_pipeline
from tests.running_services import wait_for_state

pytestmark = pytest.mark.e2e

WATCH_S = 60.0
WHOLE_FRAME = {"name": "all", "points": [[0, 0], [1, 0], [1, 1], [0, 1]]}


async def test_each_store_policy_stores_what_it_says_over_a_still_scene(
    settings: Settings, camera: TestCamera, db_pool: asyncpg.Pool
) -> None:
    own = await pipeline_settings(settings, heartbeat_interval_s=1.0)
    policies = {
        "all": {},
        "objects": {},
        "changes": {"store_every_s": 25},
        "events": {"zones": [WHOLE_FRAME]},
    }
    async with running_pipeline(own) as pipeline:
        ids: dict[str, uuid.UUID] = {}
        for policy, extra in policies.items():
            options = {"fps": 5, "imgsz": 320, "store": policy, **extra}
            response = await pipeline.api.post(
                "/init", json={"url": camera.url(STILL_MOUNT), "options": options}
            )
            assert response.status_code == 202, response.text
            ids[policy] = uuid.UUID(response.json()["id"])
        for stream_id in ids.values():
            view = await wait_for_state(pipeline.api, str(stream_id), {"ml_started", *TERMINAL}, timeout_s=90)
            assert view["state"] == "ml_started", view
        started = time.time()
        await asyncio.sleep(WATCH_S)
        stored = {
            policy: await db_pool.fetchval(
                "SELECT count(*) FROM detections WHERE stream_id = $1 AND capture_time >= to_timestamp($2)"
                " AND capture_time < to_timestamp($2) + make_interval(secs => $3)",
                stream_id,
                started,
                WATCH_S,
            )
            for policy, stream_id in ids.items()
        }
        figures = {
            policy: (await pipeline.api.get(f"/state/{stream_id}")).json()["health"]["services"]["ml"][
                "figures"
            ]
            for policy, stream_id in ids.items()
        }
        events = await db_pool.fetchval("SELECT count(*) FROM events WHERE stream_id = $1", ids["events"])
        event_frames = await db_pool.fetchval(
            "SELECT count(DISTINCT frame_seq) FROM events WHERE stream_id = $1", ids["events"]
        )
        all_events_rows = await db_pool.fetchval(
            "SELECT count(*) FROM detections WHERE stream_id = $1", ids["events"]
        )
        for stream_id in ids.values():
            assert (await pipeline.api.post("/shutdown", json={"id": str(stream_id)})).status_code == 202
        for stream_id in ids.values():
            await wait_for_state(pipeline.api, str(stream_id), TERMINAL, timeout_s=30)
    assert stored["all"] >= 0.7 * WATCH_S * 5, stored
    assert stored["objects"] >= 0.7 * WATCH_S * 5, "people stand in every frame"
    assert 2 <= stored["changes"] <= 12, f"a handful under changes: {stored}"
    assert events > 0 and all_events_rows == event_frames, "events: the frames with an event, and only those"
    assert figures["changes"]["frames_not_stored"] >= 0.6 * WATCH_S * 5, "what changes kept not is counted"
    assert figures["all"]["frames_not_stored"] == 0
