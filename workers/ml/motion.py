"""Motion gating: skip the model on frames where nothing moved since the last detected one.

The check is cheap: the JPEG is decoded at an eighth of its size in grey (libjpeg scales while it
decodes, so a 768x576 frame costs a fraction of a millisecond as 96x72), blurred a little against
compression noise and compared pixel by pixel with the last frame that went through the model.
Comparing with the last *detected* frame, not the previous one, lets slow movement add up until it
counts. A frame is detected all the same once ``max_skip_s`` have passed since the last detection,
so a scene that stopped moving is still re-checked (and its row shows what stands there).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

PIXEL_THRESHOLD = 25  # grey levels: a pixel whose change stays below this has not moved


class MotionGate:
    """Says for each frame of a stream whether it must go through the model."""

    def __init__(self, *, min_changed: float, max_skip_s: float) -> None:
        self.min_changed = min_changed
        self.max_skip_s = max_skip_s
        self.skipped = 0
        self.last_changed = 0.0  # fraction of pixels changed in the latest frame checked
        self._reference: np.ndarray[Any, Any] | None = None
        self._detected_at = 0.0

    def should_detect(self, jpeg: bytes, capture_ts: float) -> bool:
        """True when the frame moved enough, or the last detection is ``max_skip_s`` old; counts skips.

        A frame that cannot be decoded is detected (the detector then reports what is wrong with it).
        """
        small = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8)
        if small is None:
            return True
        small = cv2.GaussianBlur(small, (3, 3), 0)
        reference = self._reference
        due = capture_ts - self._detected_at >= self.max_skip_s
        if reference is None or reference.shape != small.shape or due:
            self._accept(small, capture_ts)
            return True
        changed = np.count_nonzero(cv2.absdiff(small, reference) > PIXEL_THRESHOLD)
        self.last_changed = changed / small.size
        if self.last_changed >= self.min_changed:
            self._accept(small, capture_ts)
            return True
        self.skipped += 1
        return False

    def _accept(self, small: np.ndarray[Any, Any], capture_ts: float) -> None:
        self._reference = small
        self._detected_at = capture_ts
