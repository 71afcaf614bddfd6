"""Test camera: a GStreamer RTSP server that loops an H.264 clip in real time on several mount points.

Run by the *system* Python (it needs ``python3-gi`` and ``gir1.2-gst-rtsp-server-1.0``, which a
virtual environment does not see)::

    /usr/bin/python3 deploy/camera/rtsp_server.py --port 8554 --clip .lookout/camera/vtest.h264 \
        --mount cam1 --mount cam2 --mount still=.lookout/camera/vtest-still.h264

The clip is an Annex-B H.264 elementary stream without B-frames and with a keyframe about every
second (``deploy/camera/clip.py`` makes one). ``multifilesrc loop=true`` re-reads the file forever
and ``h264parse`` keeps the timestamps running across the loop, so the stream never ends and is
paced by the clock, not by the disk; nothing is decoded or re-encoded. Every mount shares one
media pipeline between its clients, and the server's thread pool is larger than one so that
concurrent clients do not wait on each other (DESIGN.md). The line ``READY <port>`` on stdout tells a
parent that the server listens. SIGTERM/SIGINT or the death of its parent stop
it; SIGSTOP freezes it with its connections open. ``PLAYING <mount> <unix time>`` on stdout says
when a mount's clip started playing from its beginning (its first client came).

This file must stay importable without the venv's packages: it uses the standard library and GI only.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

# Clock-paced loop of the clip; config-interval=-1 repeats SPS/PPS with every keyframe so a client
# joining the shared media mid-stream can decode from its first keyframe on.
PIPELINE = (
    '( multifilesrc location="{clip}" loop=true '
    'caps="video/x-h264,stream-format=byte-stream,framerate={fps}/1" '
    "! h264parse name=parse ! rtph264pay name=pay0 pt=96 config-interval=-1 )"
)


def _pts_from_dts(_pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
    # On a bare elementary stream h264parse sets decode timestamps only; without B-frames the
    # presentation time equals the decode time, and the payloader needs it for its RTP timestamps.
    buffer = info.get_buffer()
    if buffer is not None and buffer.pts == Gst.CLOCK_TIME_NONE:
        buffer.pts = buffer.dts
    return Gst.PadProbeReturn.OK


def _on_media_configure(
    _factory: GstRtspServer.RTSPMediaFactory, media: GstRtspServer.RTSPMedia, mount: str
) -> None:
    parse = media.get_element().get_by_name("parse")
    parse.get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, _pts_from_dts)

    def on_state(_media: GstRtspServer.RTSPMedia, state: int) -> None:
        # the clip plays from its start from here on (clock-paced): a test can tell its phase
        if state == Gst.State.PLAYING:
            sys.stdout.write(f"PLAYING {mount} {time.time():.3f}\n")
            sys.stdout.flush()

    media.connect("new-state", on_state)


def build_server(
    *, host: str, port: int, mounts: dict[str, Path], fps: int, threads: int
) -> GstRtspServer.RTSPServer:
    """An RTSP server with one shared, looping media factory per mount point, each on its clip."""
    server = GstRtspServer.RTSPServer()
    server.set_address(host)
    server.set_service(str(port))
    pool = server.get_thread_pool()
    pool.set_max_threads(threads)
    mount_points = server.get_mount_points()
    for mount, clip in mounts.items():
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(PIPELINE.format(clip=clip, fps=fps))
        factory.set_shared(True)
        factory.connect("media-configure", _on_media_configure, mount.strip("/"))
        mount_points.add_factory("/" + mount.strip("/"), factory)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clip", type=Path, required=True, help="Annex-B H.264 file without B-frames")
    parser.add_argument(
        "--mount", action="append", default=[], help="mount point NAME or NAME=CLIP (repeatable)"
    )
    parser.add_argument("--fps", type=int, default=10, help="frame rate the clips are played at")
    parser.add_argument("--threads", type=int, default=8, help="RTSP server thread pool size (> 1)")
    args = parser.parse_args(argv)
    mounts = {}
    for mount in args.mount or ["cam1"]:
        name, _, clip = mount.partition("=")
        mounts[name] = Path(clip) if clip else args.clip
    for clip in mounts.values():
        if not clip.is_file():
            parser.error(f"clip not found: {clip}")

    Gst.init(None)
    server = build_server(
        host=args.host,
        port=args.port,
        mounts={name: clip.resolve() for name, clip in mounts.items()},
        fps=args.fps,
        threads=max(2, args.threads),
    )
    loop = GLib.MainLoop()
    if server.attach(None) == 0:
        sys.stderr.write(f"rtsp_server: cannot listen on {args.host}:{args.port}\n")
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, sig, loop.quit)
    # Drop finished sessions regularly so dead clients do not keep shared media alive.
    GLib.timeout_add_seconds(2, lambda: server.get_session_pool().cleanup() >= 0)
    parent = os.getppid()

    def parent_alive() -> bool:
        # A camera whose test or demo died must not outlive it.
        if os.getppid() != parent:
            loop.quit()
            return False
        return True

    GLib.timeout_add_seconds(1, parent_alive)
    sys.stdout.write(f"READY {server.get_bound_port()}\n")
    sys.stdout.flush()
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
