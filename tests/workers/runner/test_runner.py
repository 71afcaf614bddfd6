"""The runner against the real test camera and the real broker: frames, acks, failures, no leftovers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator

import cv2
import numpy as np
import psutil
import pytest

from core.messages import (
    CameraState,
    ErrorKind,
    EventKind,
    Service,
    StartCommand,
    StateEvent,
    StopCommand,
    StreamOptions,
)
from core.states import StreamState
from deploy.camera.control import TestCamera
from tests.workers.runner.conftest import (
    MAX_SIDE,
    OPEN_TIMEOUT_MS,
    READ_TIMEOUT_MS,
    RECONNECT_BUDGET_S,
    Event,
    Frame,
    RunnerHarness,
    runner_settings,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# The child needs a moment to start an interpreter and import OpenCV before its budget starts ticking.
SPAWN_ALLOWANCE_S = 4.0
# The capture process never gives up before one full open attempt (workers/runner/capture.py).
GIVE_UP_WINDOW_S = max(RECONNECT_BUDGET_S, OPEN_TIMEOUT_MS / 1000 + 1.0)


def is_runner_started(event: StateEvent) -> bool:
    return event.kind == EventKind.PROGRESS and event.state == StreamState.RUNNER_STARTED


def is_ack(event: StateEvent) -> bool:
    return event.kind == EventKind.ACK


def assert_numbered_by_the_clock(seqs: list[int]) -> None:
    """Frame numbers strictly increase and come from the wall clock in milliseconds, so a restarted
    capture process never reuses one."""
    assert seqs == sorted(set(seqs)), "frame numbers must strictly increase"
    assert abs(seqs[-1] / 1000 - time.time()) < 60


def is_error(event: StateEvent) -> bool:
    return event.kind == EventKind.ERROR


def measured_fps(frames: list[Frame], skip_s: float = 1.0) -> float:
    """Rate from the frames' capture times, after the first ``skip_s`` seconds of the stream."""
    start = frames[0].headers.capture_ts + skip_s
    times = [f.headers.capture_ts for f in frames if f.headers.capture_ts >= start]
    return (len(times) - 1) / (times[-1] - times[0])


def spans(seconds: float, skip_s: float = 1.0) -> Callable[[list[Frame]], bool]:
    """``until`` predicate: the frames cover ``seconds`` after the first ``skip_s``."""

    def covered(frames: list[Frame]) -> bool:
        return (
            bool(frames) and frames[-1].headers.capture_ts - frames[0].headers.capture_ts >= skip_s + seconds
        )

    return covered


def pid_gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def stop_and_wait_ack(runner: RunnerHarness, stream_id: str) -> float:
    """Send a stop; returns the seconds until the runner's ack arrived."""
    sent = await runner.send(StopCommand(stream_id=stream_id))
    ack = await runner.wait_event(stream_id, is_ack, within=10)
    return ack.received_at - sent


@pytest.fixture
def blackhole_port() -> Iterator[int]:
    """A loopback port whose connections are queued by the kernel and never answered."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


async def test_start_publishes_decodable_frames_at_the_requested_rate_then_runner_started(
    runner: RunnerHarness, camera: TestCamera
) -> None:
    stream_id = await runner.start_stream(camera.url("cam1"), fps=5)

    await runner.wait_event(stream_id, is_runner_started, within=20)
    frames = await runner.collect_frames(stream_id, spans(4.0), within=15)

    assert 4.0 <= measured_fps(frames) <= 6.0
    seqs = [f.headers.frame_seq for f in frames]
    assert_numbered_by_the_clock(seqs)
    captured = [f.headers.capture_ts for f in frames]
    assert captured == sorted(captured)
    assert abs(captured[-1] - time.time()) < 10
    for frame in frames[:: max(1, len(frames) // 5)]:
        image = cv2.imdecode(np.frombuffer(frame.jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None
        assert image.shape[:2] == (480, MAX_SIDE) == (frame.headers.height, frame.headers.width)
    assert frame.jpeg[:2] == b"\xff\xd8"  # raw JPEG, no envelope

    assert await stop_and_wait_ack(runner, stream_id) < 3


async def test_stop_acknowledges_within_3s_and_the_capture_process_is_gone(
    runner: RunnerHarness, camera: TestCamera
) -> None:
    stream_id = await runner.start_stream(camera.url("cam2"), fps=2)
    await runner.wait_event(stream_id, is_runner_started, within=20)
    pid = runner.handler.streams[stream_id].pid
    assert pid is not None and not pid_gone(pid)

    assert await stop_and_wait_ack(runner, stream_id) < 3

    ack = await runner.wait_event(stream_id, is_ack, within=1)
    assert ack.event.error is None
    assert pid_gone(pid)
    assert stream_id not in runner.handler.streams


async def test_stop_for_a_stream_never_started_is_acknowledged(runner: RunnerHarness) -> None:
    assert await stop_and_wait_ack(runner, "never-started") < 3
    ack = await runner.wait_event("never-started", is_ack, within=1)
    assert ack.event.error is None


async def test_four_streams_at_once_each_at_its_own_rate(runner: RunnerHarness, camera: TestCamera) -> None:
    rates = {"cam1": 2.0, "cam2": 3.0, "cam3": 4.0, "cam4": 5.0}
    streams = {await runner.start_stream(camera.url(mount), fps=fps): fps for mount, fps in rates.items()}

    for stream_id in streams:
        await runner.wait_event(stream_id, is_runner_started, within=25)
    for stream_id, fps in streams.items():
        frames = await runner.collect_frames(stream_id, spans(5.0), within=20)
        assert 0.8 * fps <= measured_fps(frames) <= 1.2 * fps, (fps, measured_fps(frames))
        assert_numbered_by_the_clock([f.headers.frame_seq for f in frames])

    acks = await asyncio.gather(*(stop_and_wait_ack(runner, s) for s in streams))
    assert max(acks) < 3


async def test_killed_camera_is_retried_then_reported_as_error_within_the_budget(
    runner: RunnerHarness, own_camera: TestCamera
) -> None:
    stream_id = await runner.start_stream(own_camera.url("cam1"), fps=5)
    await runner.wait_event(stream_id, is_runner_started, within=20)
    pid = runner.handler.streams[stream_id].pid

    own_camera.kill()
    killed_at = time.monotonic()
    error = await runner.wait_event(stream_id, is_error, within=GIVE_UP_WINDOW_S + 10)

    assert error.received_at - killed_at <= GIVE_UP_WINDOW_S + 1.5
    assert error.event.error is not None
    attempts = re.search(r"after (\d+) connection attempt", error.event.error)
    assert attempts is not None and int(attempts.group(1)) >= 2, error.event.error
    assert error.event.error_kind is ErrorKind.CAMERA  # retried by the lifecycle for its window
    assert pid is not None and pid_gone(pid)
    assert stream_id not in runner.handler.streams
    assert await stop_and_wait_ack(runner, stream_id) < 3  # nothing left to stop, still acknowledged


async def test_camera_back_within_the_budget_resumes_the_stream(
    runner: RunnerHarness, own_camera: TestCamera
) -> None:
    stream_id = await runner.start_stream(own_camera.url("cam1"), fps=5)
    await runner.wait_event(stream_id, is_runner_started, within=20)
    before = await runner.collect_frames(stream_id, lambda f: len(f) >= 3, within=10)

    own_camera.kill()
    await asyncio.sleep(1.0)
    own_camera.start(port=own_camera.port)
    after = await runner.collect_frames(stream_id, lambda f: len(f) >= len(before) + 10, within=15)

    assert_numbered_by_the_clock([f.headers.frame_seq for f in after])  # carries on across the reconnect
    assert not [e for e in runner.events_of(stream_id) if is_error(e.event)]
    assert await stop_and_wait_ack(runner, stream_id) < 3


async def test_frozen_camera_is_detected_within_twice_the_read_timeout(
    runner: RunnerHarness, own_camera: TestCamera
) -> None:
    stream_id = await runner.start_stream(own_camera.url("cam1"), fps=5)
    await runner.wait_event(stream_id, is_runner_started, within=20)
    await runner.collect_frames(stream_id, lambda f: len(f) >= 3, within=10)

    own_camera.freeze()
    frozen_at = time.monotonic()
    error = await runner.wait_event(
        stream_id, is_error, within=2 * READ_TIMEOUT_MS / 1000 + GIVE_UP_WINDOW_S + 10
    )

    reason = error.event.error or ""
    assert "frozen" in reason, reason
    assert error.event.error_kind is ErrorKind.CAMERA
    # The budget runs from the detection; the reason says how long it ran.
    spent = re.search(r"attempt\(s\) in ([\d.]+)s", reason)
    assert spent is not None, reason
    detected_after = error.received_at - frozen_at - float(spent.group(1))
    assert detected_after <= 2 * READ_TIMEOUT_MS / 1000, (detected_after, reason)
    assert stream_id not in runner.handler.streams


async def test_unreachable_address_is_reported_within_the_open_timeout_budget(
    runner: RunnerHarness, blackhole_port: int
) -> None:
    sent = time.monotonic()
    stream_id = await runner.start_stream(f"rtsp://user:secret@127.0.0.1:{blackhole_port}/cam", fps=5)

    error = await runner.wait_event(stream_id, is_error, within=GIVE_UP_WINDOW_S + SPAWN_ALLOWANCE_S + 10)

    assert error.received_at - sent <= GIVE_UP_WINDOW_S + SPAWN_ALLOWANCE_S
    reason = error.event.error or ""
    assert "open" in reason, reason
    assert "secret" not in reason
    assert not runner.frames_of(stream_id)


async def test_capture_process_that_dies_is_reported_at_once(
    runner: RunnerHarness, camera: TestCamera
) -> None:
    stream_id = await runner.start_stream(camera.url("cam3"), fps=2)
    await runner.wait_event(stream_id, is_runner_started, within=20)
    pid = runner.handler.streams[stream_id].pid
    assert pid is not None

    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    error = await runner.wait_event(stream_id, is_error, within=5)

    assert error.received_at - killed_at < 1.0
    assert "exit code -9" in (error.event.error or "")
    assert error.event.error_kind is ErrorKind.PROCESS  # the lifecycle restarts the runner for it
    assert stream_id not in runner.handler.streams


async def test_stuck_capture_process_is_killed_and_the_stop_still_acked_within_3s(
    runner: RunnerHarness, camera: TestCamera
) -> None:
    stream_id = await runner.start_stream(camera.url("cam4"), fps=2)
    await runner.wait_event(stream_id, is_runner_started, within=20)
    pid = runner.handler.streams[stream_id].pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # ignores the cooperative stop and SIGTERM alike

    assert await stop_and_wait_ack(runner, stream_id) < 3

    ack = await runner.wait_event(stream_id, is_ack, within=1)
    assert "killed" in (ack.event.error or "")
    assert pid_gone(pid)


async def test_runner_shutdown_stops_its_capture_processes_and_fails_no_stream(
    kafka_bootstrap: str, camera: TestCamera
) -> None:
    harness = RunnerHarness(runner_settings(kafka_bootstrap))
    await harness.start()
    try:
        stream_id = await harness.start_stream(camera.url("cam1"), fps=2)
        await harness.wait_event(stream_id, is_runner_started, within=20)
        pid = harness.handler.streams[stream_id].pid
        assert pid is not None

        await harness.stop_service()

        assert pid_gone(pid)
        for _ in range(20):  # nothing comes: the lifecycle restarts the stream once a runner is back
            await harness.states.poll()
        assert not [e for e in harness.events_of(stream_id) if is_error(e.event)]
    finally:
        await harness.close()


def is_heartbeat(event: StateEvent) -> bool:
    return event.kind == EventKind.HEARTBEAT


async def test_a_running_stream_has_heartbeats_with_its_live_figures(
    runner: RunnerHarness, camera: TestCamera
) -> None:
    stream_id = await runner.start_stream(camera.url("cam2"), fps=5)
    await runner.wait_event(stream_id, is_runner_started, within=20)
    await runner.collect_frames(stream_id, spans(2.0), within=15)

    steady_at = time.monotonic() + 1.5  # one heartbeat interval on, the rate is the stream's

    async def steady_heartbeat() -> Event:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            beats = [
                e for e in runner.events_of(stream_id) if is_heartbeat(e.event) and e.received_at > steady_at
            ]
            if beats:
                return beats[0]
            await runner.states.poll()
        raise AssertionError("no heartbeat")

    later = await steady_heartbeat()
    figures = later.event.figures
    assert figures is not None and figures.camera is CameraState.STREAMING
    assert (
        figures.frames_published and figures.frames_read and figures.frames_read >= figures.frames_published
    )
    assert 3.0 <= figures.fps <= 7.0, figures
    assert figures.newest_frame_age_s is not None and figures.newest_frame_age_s < 2.0
    assert figures.reconnects == 0
    assert later.event.service is Service.RUNNER and later.event.state is None
    assert await stop_and_wait_ack(runner, stream_id) < 3


async def test_a_restart_replaces_the_capture_process_and_frame_numbers_keep_increasing(
    runner: RunnerHarness, camera: TestCamera
) -> None:
    stream_id = await runner.start_stream(camera.url("cam3"), fps=5)
    await runner.wait_event(stream_id, is_runner_started, within=20)
    before = await runner.collect_frames(stream_id, lambda f: len(f) >= 3, within=10)
    old_pid = runner.handler.streams[stream_id].pid

    restart = StartCommand(
        stream_id=stream_id,
        url_sealed=runner.seal(camera.url("cam3")),
        options=StreamOptions(fps=5),
        replace=True,
        reason="test",
    )
    await runner.send(restart)
    after = await runner.collect_frames(stream_id, lambda f: len(f) >= len(before) + 5, within=20)

    new_pid = runner.handler.streams[stream_id].pid
    assert new_pid != old_pid and old_pid is not None and pid_gone(old_pid)
    assert_numbered_by_the_clock([f.headers.frame_seq for f in after])
    assert not [e for e in runner.events_of(stream_id) if is_error(e.event)]
    # a command for ML only is not the runner's
    await runner.send(restart.model_copy(update={"command_id": "ml-only", "service": Service.ML}))
    await runner.collect_frames(stream_id, lambda f: len(f) >= len(after) + 3, within=10)
    assert runner.handler.streams[stream_id].pid == new_pid
    assert await stop_and_wait_ack(runner, stream_id) < 3
