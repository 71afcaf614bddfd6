"""Turn a decoded camera image into the published frame: resized to the maximum side, JPEG-encoded."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
from cv2.typing import MatLike


@dataclass(frozen=True)
class EncodedFrame:
    """A frame ready to publish; ``capture_ts`` is the wall-clock time it was read from the camera."""

    jpeg: bytes
    width: int
    height: int
    capture_ts: float


def resize_to_max_side(image: MatLike, max_side: int) -> MatLike:
    """Scale ``image`` down so that its longer side is at most ``max_side``; never scales up."""
    height, width = image.shape[:2]
    longest = max(height, width)
    if max_side <= 0 or longest <= max_side:
        return image
    scale = max_side / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def encode_frame(image: MatLike, *, max_side: int, jpeg_quality: int, capture_ts: float) -> EncodedFrame:
    """Resize and JPEG-encode one BGR image."""
    resized = resize_to_max_side(image, max_side)
    ok, buffer = cv2.imencode(".jpg", resized, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    height, width = resized.shape[:2]
    return EncodedFrame(jpeg=buffer.tobytes(), width=width, height=height, capture_ts=capture_ts)
