"""The whole pipeline end to end: real servers, the real YOLO model, the real test camera (people walking).

One pipeline serves the module (runner, ML, API, outbox relay, state bridge, Temporal worker, all
in-process; capture and detection run in spawned OS processes); each test starts streams of its own.
The happy path holds the bounds the project promises: ``ml_started`` within 15 s of ``POST /init``
and ``inactive`` within 5 s of ``POST /shutdown``, with no process left behind for the stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import cv2
import httpx
import numpy as np
import pytest

from core.settings import Settings
from deploy.camera.control import TestCamera
from deploy.servers import venv_bin
from tests.e2e.pipeline import TERMINAL, Pipeline, living_children, pipeline_settings, running_pipeline
from tests.running_services import wait_for_state

pytestmark = pytest.mark.e2e

STARTUP_BOUND_S = 15.0  # POST /init -> ml_started
SHUTDOWN_BOUND_S = 5.0  # POST /shutdown -> inactive
STREAM_OPTIONS = {"fps": 5, "imgsz": 320}

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
async def pipeline(settings: Settings) -> AsyncIterator[Pipeline]:
    e2e_settings = await pipeline_settings(settings, startup_deadline_s=30.0, camera_retry_s=8.0)
    async with running_pipeline(e2e_settings) as running:
        yield running


async def start_running_stream(pipeline: Pipeline, url: str) -> tuple[str, float]:
    """``POST /init`` and wait for ``ml_started``; returns the stream id and the seconds it took."""
    started = time.monotonic()
    response = await pipeline.api.post("/init", json={"url": url, "options": STREAM_OPTIONS})
    assert response.status_code == 202, response.text
    stream_id: str = response.json()["id"]
    view = await wait_for_state(pipeline.api, stream_id, {"ml_started", *TERMINAL}, timeout_s=60)
    assert view["state"] == "ml_started", view
    startup_s = time.monotonic() - started
    log.info("stream %s: ml_started %.2f s after /init", stream_id, startup_s)
    return stream_id, startup_s


def stream_processes(pipeline: Pipeline, stream_id: str) -> dict[str, int]:
    """The stream's capture and detection processes, which must be running children of this test."""
    pids = pipeline.stream_pids(stream_id)
    assert set(pids) == {"runner", "ml"}, pids
    assert set(pids.values()) <= living_children(), pids
    return pids


def assert_no_process_left(pipeline: Pipeline, stream_id: str, pids: dict[str, int]) -> None:
    assert pipeline.stream_pids(stream_id) == {}
    left = {service: pid for service, pid in pids.items() if pid in living_children()}
    assert left == {}, f"processes of stream {stream_id} still running: {left}"


async def detections(pipeline: Pipeline, stream_id: str) -> list[dict[str, Any]]:
    response = await pipeline.api.get("/detection_result", params={"id": stream_id, "limit": 200})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def with_person(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [i for i in items if any(o["class"] == "person" for o in i["objects"])]


async def wait_for_person_rows(pipeline: Pipeline, stream_id: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while len(rows := with_person(await detections(pipeline, stream_id))) < count:
        assert time.monotonic() < deadline, f"only {len(rows)} rows with a person after 30 s"
        await asyncio.sleep(0.3)
    return rows


async def stored_state(db: asyncpg.Pool, stream_id: str) -> tuple[str, str | None]:
    row = await db.fetchrow("SELECT state, error_reason FROM streams WHERE id = $1::uuid", stream_id)
    assert row is not None
    return row["state"], row["error_reason"]


async def test_stream_runs_stores_person_detections_with_image_links_and_stops_leaving_no_process(
    pipeline: Pipeline, camera: TestCamera
) -> None:
    stream_id, startup_s = await start_running_stream(pipeline, camera.url("cam1"))
    assert startup_s <= STARTUP_BOUND_S, f"ml_started {startup_s:.1f}s after /init"
    pids = stream_processes(pipeline, stream_id)

    first = await wait_for_person_rows(pipeline, stream_id, 3)
    later = await wait_for_person_rows(pipeline, stream_id, len(first) + 3)
    assert later[0]["frame_seq"] > first[0]["frame_seq"], "rows with a person keep coming"
    async with httpx.AsyncClient(timeout=10) as s3:
        for item in later[:3]:
            image = await s3.get(item["image_url"])
            assert image.status_code == 200, item["image_url"]
            assert image.headers["content-type"] == "image/jpeg"
            decoded = cv2.imdecode(np.frombuffer(image.content, np.uint8), cv2.IMREAD_COLOR)
            assert decoded is not None and decoded.shape[:2] == (item["height"], item["width"])

    requested = time.monotonic()
    response = await pipeline.api.post("/shutdown", json={"id": stream_id})
    assert response.status_code == 202, response.text
    view = await wait_for_state(pipeline.api, stream_id, TERMINAL, timeout_s=30)
    shutdown_s = time.monotonic() - requested
    log.info("stream %s: inactive %.2f s after /shutdown", stream_id, shutdown_s)
    assert view["state"] == "inactive", view
    assert shutdown_s <= SHUTDOWN_BOUND_S, f"inactive {shutdown_s:.1f}s after /shutdown"
    assert_no_process_left(pipeline, stream_id, pids)


async def test_camera_killed_mid_stream_is_retried_then_ends_in_inactive_error_naming_the_camera(
    pipeline: Pipeline, own_camera: TestCamera
) -> None:
    stream_id, _ = await start_running_stream(pipeline, own_camera.url("cam1"))
    pids = stream_processes(pipeline, stream_id)

    own_camera.kill()
    view = await wait_for_state(pipeline.api, stream_id, TERMINAL, timeout_s=45)

    assert view["state"] == "inactive_error", view
    assert view["error_reason"].startswith("camera unreachable for"), view["error_reason"]
    assert_no_process_left(pipeline, stream_id, pids)


async def test_temporal_workflow_cancel_stops_a_running_stream_to_a_terminal_state_in_postgres(
    pipeline: Pipeline, camera: TestCamera, db_pool: asyncpg.Pool
) -> None:
    stream_id, _ = await start_running_stream(pipeline, camera.url("cam2"))
    pids = stream_processes(pipeline, stream_id)

    cli = await asyncio.create_subprocess_exec(
        venv_bin("temporal"), "workflow", "cancel", "-w", f"stream-{stream_id}",
        "--address", pipeline.settings.temporal_address,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await cli.communicate()
    assert cli.returncode == 0, output.decode()

    deadline = time.monotonic() + 30
    while (stored := await stored_state(db_pool, stream_id))[0] not in TERMINAL:
        assert time.monotonic() < deadline, f"stream {stream_id} still {stored[0]} 30 s after the cancel"
        await asyncio.sleep(0.2)
    assert stored == ("inactive", None)
    reasons = await db_pool.fetch(
        "SELECT to_state, reason FROM stream_events WHERE stream_id = $1::uuid ORDER BY version", stream_id
    )
    assert ("init_shutdown", "workflow cancelled") in [(r["to_state"], r["reason"]) for r in reasons]
    assert_no_process_left(pipeline, stream_id, pids)
