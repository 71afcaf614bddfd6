"""Live-view benchmark (not a test): what watching a stream costs, with 0, 1 and 5 viewers.

Runs what ``lookout up`` runs (throw-away folder, free ports), starts one stream of the demo clip,
then samples the CPU of every process group (as benchmarks/cpu_breakdown.py does) for ``--seconds``
in each phase: nobody watching, one viewer, five viewers of the stream's MJPEG live view (readers in
threads of this script, reading every part as a browser does). Printed side by side, with the
frames each viewer got per second; the live frames dropped are read from the services' metrics.

    .venv/bin/python benchmarks/live_view_bench.py [--fps 5] [--imgsz 640] [--store objects|events]
        [--seconds 40] [--warm-up-s 45]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.cpu_breakdown import cpu_spent, out  # noqa: E402
from benchmarks.throwaway import running_lookout  # noqa: E402

BOUNDARY = b"--lookout-frame\r\n"
PHASES = (0, 1, 5)
SHOWN = (
    "ML detection processes",
    "ML inference engine",
    "lookout-ml service",
    "lookout-api service",
    "Kafka (broker)",
)


class MjpegViewer(threading.Thread):
    """Reads a live view's parts until stopped; counts the frames it got."""

    def __init__(self, base_url: str, path: str) -> None:
        super().__init__(daemon=True)
        self.url = base_url + path
        self.frames = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as http, http.stream("GET", self.url) as response:
            response.raise_for_status()
            for chunk in response.iter_raw():
                self.frames += chunk.count(BOUNDARY)
                if self.stop.is_set():
                    return


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fps", type=float, default=5)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--warm-up-s", type=float, default=45)
    parser.add_argument(
        "--store",
        default="objects",
        help="the stream's store policy: with `objects` (the default) a watched frame is mostly one "
        "stored anyway (its JPEG is made once); `events` stores few, so watching encodes its own",
    )
    args = parser.parse_args()
    with running_lookout("live", ["cam1"]) as (run, client, camera):
        stream_id = str(
            client.init(camera.url("cam1"), {"fps": args.fps, "imgsz": args.imgsz, "store": args.store})["id"]
        )
        out(f"stream started; warming up {args.warm_up_s:g} s, then {args.seconds:g} s per phase ...")
        time.sleep(args.warm_up_s)
        results: dict[int, tuple[dict[str, float], float, float]] = {}
        for viewers in PHASES:
            readers = [MjpegViewer(run.api_url, client.live(stream_id)["url"]) for _ in range(viewers)]
            for reader in readers:
                reader.start()
            time.sleep(5.0 if viewers else 0.0)  # the watch reaches ML, the frames flow
            got_before = sum(r.frames for r in readers)
            spent, _resident, took = cpu_spent(args.seconds)
            per_viewer = (sum(r.frames for r in readers) - got_before) / took / max(1, viewers)
            results[viewers] = (spent, took, per_viewer)
            for reader in readers:
                reader.stop.set()
            time.sleep(run.runtime.live_watch_for_s + 3.0)  # the last watch runs out
        ml_metrics = httpx.get(f"http://127.0.0.1:{run.runtime.metrics_port_ml}/metrics").text
        api_metrics = httpx.get(f"{run.api_url}/metrics").text
        out("")
        out(
            f"one stream at {args.fps:g} fps, imgsz {args.imgsz}, store {args.store}, {os.cpu_count()} cores; "
            "% of a core per group"
        )
        out(f"{'process group':32}" + "".join(f"{f'{v} viewers':>12}" for v in PHASES))
        for name in (*SHOWN, "all of Lookout"):
            cells = []
            for viewers in PHASES:
                spent, took, _ = results[viewers]
                seconds = sum(spent.values()) if name == "all of Lookout" else spent.get(name, 0.0)
                cells.append(f"{seconds / took * 100:12.1f}")
            out(f"{name:32}" + "".join(cells))
        out(f"{'frames/s per viewer':32}" + "".join(f"{results[v][2]:12.2f}" for v in PHASES))
        base = sum(results[0][0].values()) / results[0][1]
        for viewers in PHASES[1:]:
            spent, took, _ = results[viewers]
            out(f"all of Lookout with {viewers} viewers / 0 viewers: {sum(spent.values()) / took / base:.3f}")
        published = metric(ml_metrics, "lookout_live_frames_published_total")
        dropped_ml = metric(ml_metrics, 'lookout_live_frames_dropped_total{where="ml"}')
        dropped_viewers = metric(api_metrics, 'lookout_live_frames_dropped_total{where="viewer"}')
        out(
            f"live frames published {published:.0f}, dropped by ML {dropped_ml:.0f}, "
            f"dropped for viewers {dropped_viewers:.0f}"
        )
        client.shutdown(stream_id)


if __name__ == "__main__":
    main()
