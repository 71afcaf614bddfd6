"""The test camera: a real RTSP server looping a real clip in real time, that tests can kill and freeze."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import psutil
import pytest

from deploy.camera.clip import CLIP_NAME, ensure_clip
from deploy.camera.control import TestCamera, rtsp_answers
from workers.runner.reader import CAPTURE_OPTIONS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class FrameCounter(threading.Thread):
    """Reads a camera URL with OpenCV over TCP and records when each frame arrived."""

    def __init__(self, url: str, read_timeout_ms: int = 5000) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.read_timeout_ms = read_timeout_ms
        self.times: list[float] = []
        self.shape: tuple[int, ...] | None = None
        self.opened = threading.Event()
        self.ended_at: float | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 5000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, self.read_timeout_ms]
        capture = cv2.VideoCapture(self.url, cv2.CAP_FFMPEG, params)
        self.opened.set()
        try:
            while capture.isOpened() and not self._halt.is_set():
                ok, image = capture.read()
                if not ok:
                    break
                self.times.append(time.monotonic())
                self.shape = image.shape
        finally:
            self.ended_at = time.monotonic()
            capture.release()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def frames_between(self, start: float, end: float) -> int:
        return len([t for t in self.times if start <= t < end])


@pytest.fixture(autouse=True)
def tcp_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", CAPTURE_OPTIONS)


@pytest.fixture
def camera(tmp_path: Path) -> Iterator[TestCamera]:
    cam = TestCamera(log_dir=tmp_path).start(mounts=["cam1", "cam2", "cam3"])
    yield cam
    cam.stop()


def wait_for_frames(counter: FrameCounter, count: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while len(counter.times) < count:
        assert time.monotonic() < deadline, f"only {len(counter.times)} frames from {counter.url}"
        time.sleep(0.05)


def test_several_mounts_serve_concurrent_clients_in_real_time(camera: TestCamera) -> None:
    counters = [FrameCounter(camera.url(m)) for m in ("cam1", "cam2", "cam3", "cam1")]
    for counter in counters:
        counter.start()
    for counter in counters:
        wait_for_frames(counter, 30)  # past the frames buffered while the stream was probed
    window_start = time.monotonic()
    time.sleep(3.0)
    rates = [c.frames_between(window_start, window_start + 3.0) / 3.0 for c in counters]
    for counter in counters:
        counter.stop()

    assert all(8.0 <= rate <= 12.0 for rate in rates), rates  # the clip's 10 fps, paced by the clock
    assert all(c.shape == (576, 768, 3) for c in counters)


def test_clip_loops_without_end(tmp_path: Path) -> None:
    short_dir = tmp_path / "short"
    short_dir.mkdir()
    two_seconds = ["-t", "2", "-c", "copy", "-f", "h264", str(short_dir / CLIP_NAME)]
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(ensure_clip()), *two_seconds], check=True)
    cam = TestCamera(clip_dir=short_dir, log_dir=tmp_path).start(mounts=["loop"])
    try:
        counter = FrameCounter(cam.url("loop"))
        counter.start()
        wait_for_frames(counter, 1)
        time.sleep(5.0)  # two and a half times the clip
        counter.stop()
    finally:
        cam.stop()

    assert counter.ended_at is not None and counter.times[-1] > counter.ended_at - 1.0
    assert len(counter.times) >= 40


def test_freeze_stops_the_flow_with_connections_open_and_resume_restarts_it(camera: TestCamera) -> None:
    counter = FrameCounter(camera.url("cam2"), read_timeout_ms=10_000)
    counter.start()
    wait_for_frames(counter, 30)

    camera.freeze()
    frozen_at = time.monotonic()
    assert not rtsp_answers(camera.host, camera.port or 0, timeout=0.5)
    time.sleep(2.0)
    camera.resume()
    resumed_at = time.monotonic()
    time.sleep(1.5)
    counter.stop()

    assert counter.frames_between(frozen_at + 0.5, resumed_at) == 0  # frames already in flight aside
    assert counter.frames_between(resumed_at, resumed_at + 1.5) >= 5
    assert rtsp_answers(camera.host, camera.port or 0)


def test_kill_drops_clients_at_once_and_a_restart_serves_on_the_same_port(camera: TestCamera) -> None:
    counter = FrameCounter(camera.url("cam3"))
    counter.start()
    wait_for_frames(counter, 30)
    port, pid = camera.port, camera.pid

    camera.kill()
    killed_at = time.monotonic()
    counter.join(5)

    assert counter.ended_at is not None and counter.ended_at - killed_at < 1.0
    assert pid is not None and not psutil.pid_exists(pid)
    camera.start(port=port)
    assert camera.port == port
    again = FrameCounter(camera.url("cam3"))
    again.start()
    wait_for_frames(again, 5)
    again.stop()


def test_stop_leaves_no_process_behind(tmp_path: Path) -> None:
    cam = TestCamera(log_dir=tmp_path).start()
    pid = cam.pid
    cam.freeze()  # even a frozen camera stops
    cam.stop()

    assert pid is not None and not psutil.pid_exists(pid)
    assert not cam.running
