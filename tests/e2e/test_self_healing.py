"""Self-healing streams end to end: real servers, the real model, the real camera, services as real
processes. Each test breaks something while a stream runs and asserts that detection rows resume
(frames captured after the break, new images in S3) while the stored state stays honest."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx
import pytest

from core.settings import Settings
from deploy.camera.control import TestCamera
from tests.e2e.healing import HEALING, HealingPipeline, healing_pipeline
from tests.e2e.pipeline import TERMINAL
from tests.running_services import wait_for_state

pytestmark = pytest.mark.e2e

log = logging.getLogger(__name__)
RECOVERY_S = 60.0  # from the break to the first new row, at most (liveness 4 s + restarts)
STARTED = {"lookout-runner": "capture process started", "lookout-ml": "detection process started"}
ENDED = {"lookout-runner": "capture process exited", "lookout-ml": "detection process stopped"}


@pytest.fixture(scope="module")
async def healing(
    settings: Settings, db_pool: asyncpg.Pool, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[HealingPipeline]:
    async with healing_pipeline(settings, db_pool, tmp_path_factory.mktemp("healing")) as pipeline:
        yield pipeline


async def assert_rows_resume(
    healing: HealingPipeline, stream_id: str, broken_at: datetime, what: str
) -> float:
    """New rows of frames captured after the break, with fresh images in S3; the state ml_started."""
    before = await healing.newest_frame(stream_id)
    took = await healing.wait_for_rows(stream_id, after=broken_at, timeout_s=RECOVERY_S, watch_state=True)
    log.info("%s: first row of a frame captured after it %.1f s later", what, took)
    newest = await healing.newest_frame(stream_id)
    assert newest["frame_seq"] > before["frame_seq"]
    async with httpx.AsyncClient(timeout=10) as s3:
        assert (await s3.get(newest["image_url"])).status_code == 200
    return took


async def finish(healing: HealingPipeline, stream_id: str) -> None:
    view, took = await healing.shut_down(stream_id)
    assert view["state"] == "inactive", view
    assert took <= healing.settings.ack_deadline_s, f"inactive {took:.1f}s after /shutdown"


async def test_kill_9_of_the_runner_service_restarts_the_stream_on_the_new_runner(
    healing: HealingPipeline, camera: TestCamera
) -> None:
    stream_id = await healing.start_stream(camera.url("cam1"))
    broken_at = datetime.now(UTC)
    os.kill(healing.pid_of("lookout-runner"), signal.SIGKILL)

    await assert_rows_resume(healing, stream_id, broken_at, "kill -9 of the runner service")
    health = (await healing.view(stream_id))["health"]
    assert health["services"]["runner"]["restarts"] >= 1
    assert health["services"]["runner"]["last_restart_reason"].startswith("no heartbeat for")
    await finish(healing, stream_id)


async def test_kill_9_of_the_ml_service_brings_detection_back(
    healing: HealingPipeline, camera: TestCamera
) -> None:
    stream_id = await healing.start_stream(camera.url("cam2"))
    broken_at = datetime.now(UTC)
    os.kill(healing.pid_of("lookout-ml"), signal.SIGKILL)

    await assert_rows_resume(healing, stream_id, broken_at, "kill -9 of the ML service")
    await finish(healing, stream_id)


@pytest.mark.parametrize(
    ("service_name", "started"),
    [("lookout-runner", "capture process started"), ("lookout-ml", "detection process started")],
)
async def test_kill_9_of_one_stream_process_restarts_it(
    healing: HealingPipeline, camera: TestCamera, service_name: str, started: str
) -> None:
    stream_id = await healing.start_stream(camera.url("cam3"))
    pid = healing.logged_pid(service_name, started, stream_id)
    broken_at = datetime.now(UTC)
    os.kill(pid, signal.SIGKILL)

    await assert_rows_resume(healing, stream_id, broken_at, f"kill -9 of one {started.split()[0]} process")
    assert healing.logged_pid(service_name, started, stream_id) != pid
    health = (await healing.view(stream_id))["health"]
    restarted = "runner" if service_name == "lookout-runner" else "ml"
    assert health["services"][restarted]["restarts"] >= 1
    await finish(healing, stream_id)


async def test_kill_9_of_the_inference_engine_two_streams_go_on_in_the_same_processes(
    healing: HealingPipeline, camera: TestCamera
) -> None:
    streams = [await healing.start_stream(camera.url(mount)) for mount in ("cam4", "cam1")]
    engine = healing.logged_pid("lookout-ml", "inference engine started", None)
    processes = [healing.logged_pid("lookout-ml", "detection process started", s) for s in streams]
    before = [(await healing.newest_frame(s))["frame_seq"] for s in streams]
    broken_at = datetime.now(UTC)
    os.kill(engine, signal.SIGKILL)

    for stream_id, seq in zip(streams, before, strict=True):
        took = await healing.wait_for_rows(stream_id, after=broken_at, timeout_s=RECOVERY_S, watch_state=True)
        log.info("kill -9 of the inference engine: a row of a frame captured after it %.1f s later", took)
        assert (await healing.newest_frame(stream_id))["frame_seq"] > seq
    assert healing.logged_pid("lookout-ml", "inference engine started", None) != engine
    assert [healing.logged_pid("lookout-ml", "detection process started", s) for s in streams] == processes
    for stream_id in streams:
        health = (await healing.view(stream_id))["health"]
        assert health["services"]["ml"]["restarts"] == 0, "the streams' processes waited for the engine"
        await finish(healing, stream_id)


async def test_a_camera_back_within_the_retry_window_is_detected_again_without_the_user(
    healing: HealingPipeline, own_camera: TestCamera
) -> None:
    stream_id = await healing.start_stream(own_camera.url("cam1"))
    own_camera.kill()
    down_at = time.monotonic()

    async def camera_unreachable() -> bool:
        health = (await healing.view(stream_id))["health"]
        return bool(health and health["services"]["runner"]["status"] == "camera_unreachable")

    while not await camera_unreachable():
        assert time.monotonic() - down_at < 30, "health never said camera_unreachable"
        await asyncio.sleep(0.3)
    back_at = datetime.now(UTC)
    own_camera.start(port=own_camera.port, mounts=["cam1"])

    await assert_rows_resume(healing, stream_id, back_at, "camera back")
    view = await healing.view(stream_id)
    assert view["health"]["camera_unreachable_since"] is None
    await finish(healing, stream_id)


async def test_a_camera_gone_for_good_ends_the_stream_after_the_window_naming_the_camera(
    healing: HealingPipeline, own_camera: TestCamera
) -> None:
    stream_id = await healing.start_stream(own_camera.url("cam1"))
    own_camera.kill()
    gone_at = time.monotonic()
    window_s = float(HEALING["camera_retry_s"])

    view = await wait_for_state(healing.api, stream_id, TERMINAL, timeout_s=window_s + 60)

    took = time.monotonic() - gone_at
    log.info("camera gone for good: inactive_error %.1f s after the kill (window %g s)", took, window_s)
    assert view["state"] == "inactive_error"
    assert view["error_reason"].startswith("camera unreachable for"), view["error_reason"]
    assert window_s <= took <= window_s + float(HEALING["runner_reconnect_budget_s"]) + 20


async def test_a_shutdown_during_a_restart_ends_the_stream_within_the_ack_deadline(
    healing: HealingPipeline, camera: TestCamera
) -> None:
    stream_id = await healing.start_stream(camera.url("cam4"))
    os.kill(healing.pid_of("lookout-runner"), signal.SIGKILL)
    await finish(healing, stream_id)


async def test_a_shutdown_during_a_camera_outage_ends_the_stream_within_the_ack_deadline(
    healing: HealingPipeline, own_camera: TestCamera
) -> None:
    stream_id = await healing.start_stream(own_camera.url("cam1"))
    own_camera.kill()
    deadline = time.monotonic() + 30
    while (await healing.view(stream_id))["health"]["services"]["runner"]["status"] != "camera_unreachable":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.3)
    await finish(healing, stream_id)


async def test_two_runners_and_two_ml_instances_one_of_each_killed_the_survivors_take_its_streams(
    settings: Settings, db_pool: asyncpg.Pool, camera: TestCamera, tmp_path: Path
) -> None:
    async with healing_pipeline(settings, db_pool, tmp_path, instances=2, supervised=False) as pair:
        streams = [await pair.start_stream(camera.url(mount)) for mount in ("cam1", "cam2", "cam3")]
        # Streams land on partitions by their random ids, so which instance runs which is chance
        # (all on one runner about one time in five): the victim of each service is the instance
        # that runs the most of them, and its streams must move to the survivor.
        placed = {
            name: {sid: _instance_running(pair, name, event, sid) for sid in streams}
            for name, event in STARTED.items()
        }
        victims = {name: max(("-0", "-1"), key=list(on.values()).count) for name, on in placed.items()}
        log.info("streams per instance %s; killing %s", placed, victims)
        broken_at = datetime.now(UTC)
        for name, instance in victims.items():
            os.kill(pair.pid_of(f"{name}{instance}"), signal.SIGKILL)

        for stream_id in streams:
            took = await pair.wait_for_rows(
                stream_id, after=broken_at, timeout_s=RECOVERY_S, watch_state=True
            )
            log.info("take-over: stream %s stores rows again after %.1f s", stream_id, took)
        for name, on in placed.items():
            survivor = "-1" if victims[name] == "-0" else "-0"
            for stream_id in [sid for sid, instance in on.items() if instance == victims[name]]:
                assert _instance_running(pair, name, STARTED[name], stream_id) == survivor, (name, stream_id)
        for stream_id in streams:
            await finish(pair, stream_id)


def _instance_running(pipeline: HealingPipeline, service: str, event: str, stream_id: str) -> str:
    """Which instance (``-0`` or ``-1``) runs the stream: the newest ``event`` (a start) that its
    process's end (ENDED) has not followed. A start can finish on an instance that is already
    handing the stream over (a rebalance while it started): that process ends a moment later."""
    newest: tuple[str, str] = ("", "")
    running: tuple[str, str] = ("", "")
    for instance in ("-0", "-1"):
        path = pipeline.service(f"{service}{instance}").log_path
        started = ended = ""
        for line in path.read_text().splitlines():
            if stream_id in line and '"time": "' in line:
                stamp = line.split('"time": "', 1)[1][:29]
                if f'"event": "{event}"' in line:
                    started = max(started, stamp)
                elif f'"event": "{ENDED[service]}"' in line:
                    ended = max(ended, stamp)
        newest = max(newest, (started, instance))
        if started > ended:
            running = max(running, (started, instance))
    assert newest[0], f"no {service} instance logged {event!r} for {stream_id}"
    return running[1] or newest[1]
