"""The test camera's walkers clip: people from ultralytics' ``bus.jpg`` pasted on a plain scene,
walking known paths (deploy/camera/scenes.py), so that what the real pipeline counts over RTSP can
be checked against the scene's true events exactly.

One pass (``WALKERS``): four people one at a time, alternately left to right and back at 150 px/s,
each crossing the door line down the middle and passing through the shop zone on the right; quiet
at the start and the end, so a loop boundary never splits a walk. H.264 like the demo clip (no
B-frames, a keyframe a second), made once with ffmpeg and cached beside it. Needs the venv (OpenCV,
ultralytics' sample images).
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import cv2
import numpy as np

from deploy.camera.clip import CLIP_FPS, DEFAULT_CLIP_DIR, ClipError
from deploy.camera.scenes import DOOR, FRAME, SHOP, Scene, Walker

WALKERS_CLIP_NAME = "walkers.h264"
# people in ultralytics' bus.jpg (x1, y1, x2, y2), as its model finds them (confidence 0.84-0.88)
BUS_PEOPLE = ((48, 399, 244, 903), (223, 405, 343, 862), (669, 397, 810, 874))
WALKER_SIZE = (62.0, 160.0)


def walkers_scene() -> Scene:
    """The clip's scene: its walkers, the door line and the shop zone (without a dwell time)."""
    width, height = FRAME
    w, h = WALKER_SIZE
    people = []
    t = 2.0
    for i in range(4):
        y = 300.0 + (i % 2) * 60.0
        path = ((40.0, y), (width - 40.0, y)) if i % 2 == 0 else ((width - 40.0, y), (40.0, y))
        walker = Walker(f"walker{i}", path, 150.0, t, w=w, h=h, confidence=0.85)
        people.append(walker)
        t = walker.end_s + 2.0
    shop = SHOP.model_copy(update={"dwell_s": None})
    scene = Scene("walkers", width, height, people, [shop], [DOOR])
    return scene


def clip_seconds(scene: Scene) -> float:
    """How long one pass of the clip lasts: the scene and a quiet second after it."""
    return round(scene.duration_s + 1.0)


def first_full_pass(scene: Scene, playing_since: float, detecting_since: float, margin_s: float = 1.5) -> int:
    """The first pass of the looping clip that a stream detecting since ``detecting_since`` sees
    whole (unix times; ``playing_since``: when the camera began the clip, its time 0): detection
    must have begun ``margin_s`` before that pass's first event."""
    first_event_s = min(e.at for e in scene.true_events())
    length = clip_seconds(scene)
    into = detecting_since - playing_since
    return max(0, math.ceil((into - first_event_s + margin_s) / length))


def ensure_walkers_clip(clip_dir: Path | None = None) -> Path:
    """The walkers clip's path, rendering it on first use."""
    clip_dir = Path(os.environ.get("LOOKOUT_CAMERA_DIR", clip_dir or DEFAULT_CLIP_DIR))
    clip = clip_dir / WALKERS_CLIP_NAME
    if clip.is_file() and clip.stat().st_size > 0:
        return clip
    clip_dir.mkdir(parents=True, exist_ok=True)
    scene = walkers_scene()
    people = _people()
    background = _background(scene.width, scene.height)
    partial = clip_dir / f".{WALKERS_CLIP_NAME}.{os.getpid()}.part"
    encoder = subprocess.Popen(
        [
            "ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{scene.width}x{scene.height}", "-r", str(CLIP_FPS),
            "-i", "-", "-an", "-c:v", "libx264", "-preset", "veryfast", "-profile:v", "main", "-bf", "0",
            "-g", str(CLIP_FPS), "-keyint_min", str(CLIP_FPS), "-sc_threshold", "0",
            "-pix_fmt", "yuv420p", "-crf", "23", "-f", "h264", str(partial),
        ],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert encoder.stdin is not None
    for n in range(int(clip_seconds(scene) * CLIP_FPS)):
        encoder.stdin.write(render(scene, n / CLIP_FPS, people, background).tobytes())
    encoder.stdin.close()
    if encoder.wait() != 0:
        raise ClipError(
            f"encoding the walkers clip failed: {encoder.stderr.read().decode()[-500:] if encoder.stderr else ''}"
        )
    os.replace(partial, clip)
    return clip


def render(scene: Scene, t: float, people: list[np.ndarray], background: np.ndarray) -> np.ndarray:
    """The frame at ``t``: each walker in view pasted at its box, facing the way it goes."""
    frame = background.copy()
    for i, walker in enumerate(scene.walkers):
        box = walker.box(t)
        if box is None:
            continue
        person = cv2.resize(people[i % len(people)], (round(box.x2 - box.x1), round(box.y2 - box.y1)))
        if walker.path[-1][0] < walker.path[0][0]:
            person = cv2.flip(person, 1)
        x1, y1 = round(box.x1), round(box.y1)
        x0, y0 = max(0, -x1), max(0, -y1)
        x2, y2 = min(scene.width, x1 + person.shape[1]), min(scene.height, y1 + person.shape[0])
        if x2 > max(0, x1) and y2 > max(0, y1):
            frame[max(0, y1) : y2, max(0, x1) : x2] = person[
                y0 : y0 + y2 - max(0, y1), x0 : x0 + x2 - max(0, x1)
            ]
    return frame


def _people() -> list[np.ndarray]:
    from ultralytics.utils import ASSETS

    bus = cv2.imread(str(ASSETS / "bus.jpg"))
    if bus is None:
        raise ClipError(f"ultralytics' bus.jpg not found in {ASSETS}")
    return [bus[y1:y2, x1:x2].copy() for x1, y1, x2, y2 in BUS_PEOPLE]


def _background(width: int, height: int) -> np.ndarray:
    """A plain floor and wall, the same in every frame (nothing moves but the walkers)."""
    frame = np.full((height, width, 3), (150, 150, 145), np.uint8)
    frame[: height // 3] = (185, 180, 175)  # the wall
    noise = np.random.default_rng(7).integers(-6, 7, size=(height, width, 1), dtype=np.int16)
    floor: np.ndarray = np.clip(frame.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return floor
