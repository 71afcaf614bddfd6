"""Motion gating and the backend a stream runs, on the real pipeline: the test camera's ``still``
mount (the clip's first frame, nothing moves) against ``cam1`` (people walking)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import cv2
import numpy as np
import pytest
from prometheus_client import REGISTRY

from core.kafka import create_producer
from core.messages import WatchCommand
from core.settings import Settings
from deploy.camera.control import STILL_MOUNT, TestCamera
from tests.e2e.pipeline import TERMINAL, Pipeline, pipeline_settings, running_pipeline
from tests.observing import consume
from tests.running_services import wait_for_state

pytestmark = pytest.mark.e2e

MAX_SKIP_S = 2.0
GATED = {"fps": 5, "imgsz": 320, "motion_gating": True, "motion_max_skip_s": MAX_SKIP_S}
WINDOW_S = 12.0
LIVE_S = 6.0  # of the window, the still stream is watched this long


@pytest.fixture(scope="module")
async def pipeline(settings: Settings) -> AsyncIterator[Pipeline]:
    e2e_settings = await pipeline_settings(settings, heartbeat_interval_s=1.0)
    async with running_pipeline(e2e_settings) as running:
        yield running


async def watch(settings: Settings, stream_id: str, seconds: float) -> None:
    """What an API serving a live view does: a watch command every second for ``seconds``."""
    producer = create_producer(settings, idempotent=False)
    await producer.start()
    try:
        for _ in range(int(seconds)):
            command = WatchCommand(stream_id=stream_id, for_s=2.0)
            await producer.send_and_wait(
                settings.topic_commands, command.model_dump_json().encode(), key=stream_id.encode()
            )
            await asyncio.sleep(1.0)
    finally:
        await producer.stop()


async def start(pipeline: Pipeline, url: str, options: dict[str, Any]) -> str:
    response = await pipeline.api.post("/init", json={"url": url, "options": options})
    assert response.status_code == 202, response.text
    stream_id: str = response.json()["id"]
    view = await wait_for_state(pipeline.api, stream_id, {"ml_started", *TERMINAL}, timeout_s=90)
    assert view["state"] == "ml_started", view
    return stream_id


async def ml_figures(pipeline: Pipeline, stream_id: str) -> dict[str, Any]:
    response = await pipeline.api.get(f"/state/{stream_id}")
    assert response.status_code == 200, response.text
    ml = ((response.json().get("health") or {}).get("services") or {}).get("ml") or {}
    return ml.get("figures") or {}


async def rows(db: asyncpg.Pool, stream_id: str) -> int:
    return int(await db.fetchval("SELECT count(*) FROM detections WHERE stream_id = $1::uuid", stream_id))


def skipped_metric(stream_id: str) -> float:
    return REGISTRY.get_sample_value("lookout_frames_skipped_total", {"stream_id": stream_id}) or 0.0


async def test_motion_gating_skips_a_still_scene_and_detects_a_moving_one(
    pipeline: Pipeline, camera: TestCamera, db_pool: asyncpg.Pool
) -> None:
    still = await start(pipeline, camera.url(STILL_MOUNT), GATED)
    moving = await start(pipeline, camera.url("cam1"), GATED)
    started = time.monotonic()
    # someone watches the still stream for a while: its skipped frames reach the live view too
    watched = asyncio.create_task(watch(pipeline.settings, still, LIVE_S))
    await asyncio.sleep(WINDOW_S)
    await watched
    # the figures of a heartbeat at least a whole window after the start
    while (figures := await ml_figures(pipeline, still)).get("frames_skipped") is None:
        assert time.monotonic() - started < WINDOW_S + 10, figures
        await asyncio.sleep(0.5)
    still_figures, moving_figures = figures, await ml_figures(pipeline, moving)
    still_skipped_metric = skipped_metric(still)
    still_rows, moving_rows = await rows(db_pool, still), await rows(db_pool, moving)
    for stream_id in (still, moving):
        response = await pipeline.api.post("/shutdown", json={"id": stream_id})
        assert response.status_code == 202
    for stream_id in (still, moving):
        assert (await wait_for_state(pipeline.api, stream_id, TERMINAL, timeout_s=30))["state"] == "inactive"

    # the still scene: detected about once per MAX_SKIP_S, every other frame skipped with no row
    detected = still_figures["frames_processed"]
    skipped = still_figures["frames_skipped"]
    assert skipped >= 3 * detected, still_figures
    assert detected <= WINDOW_S / MAX_SKIP_S + 4, still_figures  # the re-detections, and the first frame
    assert detected >= 2, still_figures  # re-detected although nothing moved
    assert still_rows <= detected + 2  # rows of detected frames only (frames after the heartbeat: +2)
    assert still_skipped_metric >= skipped  # counted in the ML service's metrics too

    # the moving scene: (nearly) every frame goes through the model and stores its row
    assert moving_figures["frames_processed"] >= 0.9 * (
        moving_figures["frames_processed"] + moving_figures["frames_skipped"]
    )
    assert moving_figures["frames_processed"] >= 0.6 * 5 * WINDOW_S, moving_figures
    assert moving_rows >= 0.9 * moving_figures["frames_processed"]
    assert moving_figures["backend"] == "openvino fp32"  # auto, on this CPU machine (no GPU here)

    # while watched, the still stream's every frame (5 fps) came to the live topic, annotated,
    # although the model ran on few of them
    live = [
        r for r in await consume(pipeline.settings, pipeline.settings.topic_live, until=bool, linger_s=1.0)
    ]
    assert {r.key for r in live} == {still.encode()}, "only the watched stream's frames"
    assert len(live) >= 0.6 * 5 * (LIVE_S - 1), f"{len(live)} live frames in {LIVE_S} s at 5 fps"
    assert len(live) >= 2 * detected, (len(live), still_figures)
    image = cv2.imdecode(np.frombuffer(live[-1].value or b"", np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[0] > 0, "a live frame is a JPEG"
