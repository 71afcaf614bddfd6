"""FrameSampler: the requested rate from real frame times, whatever the camera claims."""

from __future__ import annotations

import random

import pytest

from workers.runner.sampler import FrameSampler


def taken(sampler: FrameSampler, times: list[float]) -> list[float]:
    return [t for t in times if sampler.take(t)]


def test_camera_faster_than_requested_is_thinned_to_the_requested_rate_despite_jitter() -> None:
    rng = random.Random(7)
    times = [i / 10 + rng.uniform(-0.015, 0.015) for i in range(600)]  # 10 fps for a minute, jittery
    out = taken(FrameSampler(5), sorted(times))
    rate = (len(out) - 1) / (out[-1] - out[0])
    assert 4.9 <= rate <= 5.1


@pytest.mark.parametrize(("camera_fps", "requested"), [(25, 2), (30, 7), (10, 3), (15, 10)])
def test_long_run_rate_matches_the_request(camera_fps: float, requested: float) -> None:
    times = [i / camera_fps for i in range(int(camera_fps * 60))]
    out = taken(FrameSampler(requested), times)
    assert abs(len(out) / 60 - requested) <= 0.05 * requested


def test_camera_slower_than_requested_yields_every_frame_and_never_duplicates() -> None:
    times = [i * 0.5 for i in range(20)]  # 2 fps camera, 10 fps requested
    assert taken(FrameSampler(10), times) == times


def test_burst_of_buffered_frames_after_connecting_does_not_flood() -> None:
    burst = [0.001 * i for i in range(50)]  # 50 frames read back to back
    live = [0.05 + i / 10 for i in range(20)]
    out = taken(FrameSampler(5), burst + live)
    assert len([t for t in out if t < 0.05]) == 1
    assert len(out) <= 1 + 2 * 5 + 1


def test_after_a_stall_the_schedule_restarts_instead_of_catching_up() -> None:
    sampler = FrameSampler(5)
    assert taken(sampler, [0.0, 0.2, 0.4]) == [0.0, 0.2, 0.4]
    after_stall = [10.0 + i / 30 for i in range(30)]  # one second of a 30 fps camera after 10 s of nothing
    assert 5 <= len(taken(sampler, after_stall)) <= 6


@pytest.mark.parametrize("fps", [0, -1, float("nan")])
def test_nonsense_rate_is_refused(fps: float) -> None:
    with pytest.raises(ValueError):
        FrameSampler(fps)
