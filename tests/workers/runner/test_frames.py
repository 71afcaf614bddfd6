"""Resizing to the maximum side and JPEG encoding of published frames."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from workers.runner.frames import encode_frame, resize_to_max_side


@pytest.mark.parametrize(
    ("shape", "max_side", "expected"),
    [
        ((576, 768), 640, (480, 640)),
        ((1080, 1920), 1280, (720, 1280)),
        ((1920, 1080), 1280, (1280, 720)),
        ((480, 640), 1280, (480, 640)),  # never scaled up
        ((480, 640), 0, (480, 640)),  # 0 disables resizing
    ],
)
def test_longer_side_is_scaled_to_the_maximum(
    shape: tuple[int, int], max_side: int, expected: tuple[int, int]
) -> None:
    image = np.zeros((*shape, 3), np.uint8)
    assert resize_to_max_side(image, max_side).shape[:2] == expected


def test_encoded_frame_is_a_decodable_jpeg_of_the_reported_size_and_quality_matters() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (576, 768, 3), dtype=np.uint8)
    high = encode_frame(image, max_side=640, jpeg_quality=95, capture_ts=12.5)
    low = encode_frame(image, max_side=640, jpeg_quality=30, capture_ts=12.5)

    decoded = cv2.imdecode(np.frombuffer(high.jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None
    assert decoded.shape == (480, 640, 3)
    assert (high.width, high.height, high.capture_ts) == (640, 480, 12.5)
    assert len(low.jpeg) < len(high.jpeg)
