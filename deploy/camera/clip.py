"""The test camera's clip: OpenCV's ``vtest.avi`` (people walking) as H.264 fit for looping over RTSP.

The source comes from Debian's ``opencv-doc`` package (``apt-get download``, then ``dpkg-deb -x``;
nothing is installed). ffmpeg converts it once to an Annex-B H.264 stream without B-frames and with
a keyframe every second, the form ``rtsp_server.py`` loops without re-encoding. The result is cached
under the git-ignored data folder. Standard library only: both the venv and the system Python use it.

    python deploy/camera/clip.py            # prints the clip's path, making it when missing
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CLIP_DIR = REPO_ROOT / ".lookout" / "camera"
CLIP_NAME = "vtest.h264"
STILL_CLIP_NAME = "vtest-still.h264"
STILL_SECONDS = 10
CLIP_FPS = 10  # vtest.avi's frame rate; the server paces the loop with it
INSTALLED_SOURCE = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")


class ClipError(RuntimeError):
    """The clip could not be made; the message says which step failed."""


def ensure_clip(clip_dir: Path | None = None) -> Path:
    """Path of the converted clip, downloading and converting it on first use."""
    clip_dir = Path(os.environ.get("LOOKOUT_CAMERA_DIR", clip_dir or DEFAULT_CLIP_DIR))
    clip = clip_dir / CLIP_NAME
    if clip.is_file() and clip.stat().st_size > 0:
        return clip
    if shutil.which("ffmpeg") is None:
        raise ClipError("ffmpeg not found: run deploy/bootstrap.sh (Debian package ffmpeg)")
    clip_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lookout-clip-") as tmp:
        source = INSTALLED_SOURCE if INSTALLED_SOURCE.is_file() else _download_source(Path(tmp))
        partial = clip_dir / f".{CLIP_NAME}.{os.getpid()}.part"
        _run(
            [
                "ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(source),
                "-an", "-c:v", "libx264", "-preset", "veryfast", "-profile:v", "main",
                "-bf", "0",  # no B-frames: decode order is presentation order
                "-g", str(CLIP_FPS), "-keyint_min", str(CLIP_FPS), "-sc_threshold", "0",
                "-pix_fmt", "yuv420p", "-crf", "26", "-f", "h264", str(partial),
            ],
            "convert vtest.avi to H.264",
        )  # fmt: skip
        os.replace(partial, clip)  # atomic: concurrent callers never see half a clip
    return clip


def ensure_clip_at(fps: int, clip_dir: Path | None = None) -> Path:
    """The demo clip timed for ``fps`` frames a second (the same frames, played faster or slower):
    the H.264 stream's own timing decides the pace, so a faster camera needs its own clip."""
    source = ensure_clip(clip_dir)
    if fps == CLIP_FPS:
        return source
    timed = source.with_name(f"vtest-{fps}fps.h264")
    if timed.is_file() and timed.stat().st_size > 0:
        return timed
    partial = timed.with_name(f".{timed.name}.{os.getpid()}.part")
    _run(
        [
            "ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-r", str(CLIP_FPS), "-i", str(source),
            "-an", "-vf", f"setpts=N/{fps}/TB", "-r", str(fps),
            "-c:v", "libx264", "-preset", "veryfast", "-profile:v", "main", "-bf", "0",
            "-g", str(fps), "-keyint_min", str(fps), "-sc_threshold", "0",
            "-pix_fmt", "yuv420p", "-crf", "26", "-f", "h264", str(partial),
        ],
        f"time the clip for {fps} fps",
    )  # fmt: skip
    os.replace(partial, timed)
    return timed


def ensure_still_clip(clip_dir: Path | None = None) -> Path:
    """A clip in which nothing moves: the demo clip's first frame for 10 s, as the same kind of
    H.264 stream (for motion gating). Made from the demo clip on first use."""
    source = ensure_clip(clip_dir)
    still = source.with_name(STILL_CLIP_NAME)
    if still.is_file() and still.stat().st_size > 0:
        return still
    partial = still.with_name(f".{STILL_CLIP_NAME}.{os.getpid()}.part")
    _run(
        [
            "ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(source), "-an",
            "-vf", f"select=eq(n\\,0),loop=loop={STILL_SECONDS * CLIP_FPS - 1}:size=1:start=0,setpts=N/{CLIP_FPS}/TB",
            "-c:v", "libx264", "-preset", "veryfast", "-profile:v", "main", "-bf", "0",
            "-g", str(CLIP_FPS), "-keyint_min", str(CLIP_FPS), "-sc_threshold", "0",
            "-pix_fmt", "yuv420p", "-crf", "26", "-r", str(CLIP_FPS), "-f", "h264", str(partial),
        ],
        "make the still clip",
    )  # fmt: skip
    os.replace(partial, still)
    return still


def _download_source(workdir: Path) -> Path:
    try:
        _run(["apt-get", "download", "opencv-doc"], "apt-get download opencv-doc", cwd=workdir)
    except ClipError:  # a fresh machine may have no package lists yet
        _run(["apt-get", "update", "-qq"], "apt-get update")
        _run(["apt-get", "download", "opencv-doc"], "apt-get download opencv-doc", cwd=workdir)
    debs = sorted(workdir.glob("opencv-doc_*.deb"))
    if not debs:
        raise ClipError("apt-get download opencv-doc produced no .deb")
    _run(["dpkg-deb", "-x", str(debs[-1]), str(workdir / "x")], "extract opencv-doc")
    found = sorted((workdir / "x").rglob("vtest.avi"))
    if not found:
        raise ClipError("vtest.avi not found in opencv-doc")
    return found[0]


def _run(argv: list[str], what: str, cwd: Path | None = None) -> None:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ClipError(f"{what} failed ({result.returncode}): {result.stderr.strip()[-500:]}")


if __name__ == "__main__":
    sys.stdout.write(f"{ensure_clip()}\n")
