"""Start, break and stop the test camera (``rtsp_server.py``) from the venv: tests and the demo use it.

    camera = TestCamera().start(port=8554, mounts=["cam1", "cam2"])
    url = camera.url("cam1")          # rtsp://127.0.0.1:8554/cam1
    camera.freeze(); camera.resume()  # SIGSTOP / SIGCONT: connections stay open, no data flows
    camera.kill()                     # SIGKILL: connections drop at once
    camera.start(port=camera.port)    # back on the same port
    camera.stop()

By hand: ``.venv/bin/python -m deploy.camera.control --port 8554`` prints the URLs and serves until Ctrl-C.
The server runs under the system Python, which has GStreamer's GI bindings (Debian packages in
``deploy/apt-packages.txt``); the venv does not see them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from deploy.camera.clip import CLIP_FPS, DEFAULT_CLIP_DIR, ensure_clip_at, ensure_still_clip
from deploy.servers import free_port

SYSTEM_PYTHON = os.environ.get("LOOKOUT_CAMERA_PYTHON", "/usr/bin/python3")
SERVER_SCRIPT = Path(__file__).resolve().with_name("rtsp_server.py")
DEFAULT_MOUNTS = ("cam1", "cam2", "cam3", "cam4")
STILL_MOUNT = "still"  # always served beside the others: the clip's first frame, nothing moves


class CameraError(RuntimeError):
    """The test camera did not start or answer; the message points at its log."""


def rtsp_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when an RTSP server at ``host:port`` answers an OPTIONS request."""
    request = f"OPTIONS rtsp://{host}:{port}/ RTSP/1.0\r\nCSeq: 1\r\n\r\n".encode()
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(request)
            return sock.recv(64).startswith(b"RTSP/1.0 200")
    except OSError:
        return False


class TestCamera:
    """A looping RTSP test camera on 127.0.0.1 with several mount points, run as a child process."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        clip_dir: Path | None = None,
        log_dir: Path | None = None,
        fps: int = CLIP_FPS,
    ):
        """``fps``: the rate the clips are played at; above the clip's 10 it plays faster (the
        benchmark sends 30 fps so that one stream is limited by its model, not by the camera)."""
        self.host = host
        self.fps = fps
        self.clip_dir = clip_dir or DEFAULT_CLIP_DIR
        self.log_dir = log_dir or self.clip_dir
        self.port: int | None = None
        self.mounts: tuple[str, ...] = DEFAULT_MOUNTS
        self._proc: subprocess.Popen[bytes] | None = None
        self._frozen = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(
        self, port: int | None = None, mounts: Sequence[str] | None = None, timeout: float = 15.0
    ) -> TestCamera:
        """Start the server (on a free port unless given) and wait until it answers RTSP OPTIONS."""
        if self.running:
            raise CameraError(f"test camera already running on port {self.port}")
        clip = ensure_clip_at(self.fps, self.clip_dir)
        self.port = port or self.port or free_port()
        self.mounts = tuple(mounts or self.mounts)
        argv = [SYSTEM_PYTHON, str(SERVER_SCRIPT), "--host", self.host, "--port", str(self.port)]
        argv += ["--clip", str(clip), "--fps", str(self.fps)]
        for mount in self.mounts:
            argv += ["--mount", mount]
        argv += ["--mount", f"{STILL_MOUNT}={ensure_still_clip(self.clip_dir)}"]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"rtsp-server-{self.port}.log"
        with open(log_path, "ab") as log:
            # Output goes to a file: a pipe nobody reads would fill up and stall the server. Its own
            # session: a Ctrl-C meant for the demo must not kill the camera before the stream stops.
            self._proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self._frozen = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise CameraError(f"test camera exited with {self._proc.returncode}; see {log_path}")
            if rtsp_answers(self.host, self.port):
                return self
            time.sleep(0.1)
        self.stop()
        raise CameraError(
            f"test camera not answering on port {self.port} after {timeout:.0f}s; see {log_path}"
        )

    def started_playing_at(self, mount: str) -> float | None:
        """When ``mount``'s clip last started playing from its beginning (unix time; None: not yet)."""
        if self.port is None:
            return None
        log_path = self.log_dir / f"rtsp-server-{self.port}.log"
        times = [
            float(line.split()[2])
            for line in log_path.read_text(errors="replace").splitlines()
            if line.startswith(f"PLAYING {mount} ")
        ]
        return times[-1] if times else None

    def url(self, mount: str = "cam1") -> str:
        if self.port is None:
            raise CameraError("test camera not started")
        return f"rtsp://{self.host}:{self.port}/{mount}"

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its connections open but sends nothing (a frozen camera)."""
        self._signal(signal.SIGSTOP)
        self._frozen = True

    def resume(self) -> None:
        """SIGCONT after ``freeze``."""
        self._signal(signal.SIGCONT)
        self._frozen = False

    def kill(self) -> None:
        """SIGKILL: the camera vanishes mid-stream and its connections drop."""
        if self._proc is None:
            return
        self._signal(signal.SIGKILL)
        self._proc.wait()
        self._frozen = False

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM, SIGKILL after ``timeout``) and reap it."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            if self._frozen:
                self._signal(signal.SIGCONT)  # a stopped process would not act on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._frozen = False

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise CameraError("test camera not running")
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._proc.pid, sig)

    def __enter__(self) -> TestCamera:
        return self if self.running else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Run the test camera in the foreground until Ctrl-C or SIGTERM (for the demo and by hand)."""
    import argparse

    parser = argparse.ArgumentParser(description="Lookout's test RTSP camera (loops vtest.avi)")
    parser.add_argument("--port", type=int, default=8554)
    parser.add_argument("--mount", action="append", default=None, help="mount point (repeatable)")
    args = parser.parse_args(argv)
    camera = TestCamera().start(port=args.port, mounts=args.mount)
    signal.signal(signal.SIGTERM, lambda *_: camera.stop())
    for mount in camera.mounts:
        sys.stdout.write(f"{camera.url(mount)}\n")
    sys.stdout.flush()
    try:
        while camera.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        camera.stop()


if __name__ == "__main__":
    main()
