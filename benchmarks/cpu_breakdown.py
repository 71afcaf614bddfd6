"""CPU breakdown benchmark (not a test): where the box's CPU goes while Lookout runs N streams.

Runs what ``lookout up`` runs, in a temp folder on free ports (the machine's Postgres with a
database of its own, SeaweedFS, Apache Kafka, Temporal, the services under the supervisor, the test
camera), starts N streams of the demo clip, waits ``--warm-up-s``, then samples the CPU time of
every process for ``--seconds`` (psutil) and prints it per group: each server, each service, and
the per-stream processes of the runner (capture) and of ML (detection), found by their parent.

    .venv/bin/python benchmarks/cpu_breakdown.py [--streams 4] [--fps 5] [--imgsz 640]
        [--backend openvino] [--seconds 60] [--warm-up-s 45]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import psutil
import psycopg

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.throwaway import running_lookout  # noqa: E402

GROUPS = (  # a process belongs to the first name its command line holds
    ("weed", "SeaweedFS (S3)"),
    ("kafka.Kafka", "Kafka (broker)"),
    ("temporal", "Temporal"),
    ("rtsp", "test camera"),
    ("camera", "test camera"),
    ("postgres", "Postgres"),
)
CHILDREN_OF = {"lookout-ml": "ML detection processes", "lookout-runner": "runner capture processes"}


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def group(process: psutil.Process) -> str | None:
    """The group a process's CPU is counted in; None for processes that are not Lookout's."""
    try:
        if process.name() == "lookout-engine":  # named by workers/ml/engine_process.py
            return "ML inference engine"
        arguments = process.cmdline()
        scripts = [a.rsplit("/", 1)[1] for a in arguments if "/bin/lookout-" in a]
        if scripts:
            return f"{scripts[0]} service"
        for parent in process.parents():  # a per-stream process: forkserver children of a service
            parent_arguments = " ".join(parent.cmdline())
            for script, name in CHILDREN_OF.items():
                if f"/bin/{script}" in parent_arguments:
                    return name
        command = " ".join(arguments)
        return next((name for key, name in GROUPS if key in command), None)
    except psutil.Error:
        return None


def cpu_seconds() -> dict[int, tuple[str, float, int]]:
    """CPU time (user + system) so far and resident memory (bytes) of every process that belongs to
    a group, by pid."""
    found = {}
    for process in psutil.process_iter():
        name = group(process)
        if name is None:
            continue
        try:
            times, rss = process.cpu_times(), process.memory_info().rss
        except psutil.Error:
            continue
        found[process.pid] = (name, times.user + times.system, rss)
    return found


def cpu_spent(seconds: float) -> tuple[dict[str, float], dict[str, int], float]:
    """CPU seconds of each group over the next ``seconds`` (this waits), the groups' resident memory
    at the end (bytes), and the time it took."""
    before, started = cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    after, took = cpu_seconds(), time.monotonic() - started
    spent: dict[str, float] = defaultdict(float)
    resident: dict[str, int] = defaultdict(int)
    for pid, (name, cpu, rss) in after.items():
        spent[name] += cpu - before.get(pid, (name, 0.0, 0))[1]
        resident[name] += rss
    return spent, resident, took


def rows(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM detections").fetchone()
    return int(row[0]) if row else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--fps", type=float, default=5)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--backend", default="openvino")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warm-up-s", type=float, default=45)
    args = parser.parse_args()
    mounts = [f"cam{i + 1}" for i in range(args.streams)]
    with running_lookout("cpu", mounts) as (run, client, camera):
        options = {"fps": args.fps, "imgsz": args.imgsz, "backend": args.backend}
        ids = [str(client.init(camera.url(m), options)["id"]) for m in mounts]
        out(
            f"{len(ids)} streams started; warming up {args.warm_up_s:g} s, then sampling {args.seconds:g} s ..."
        )
        time.sleep(args.warm_up_s)
        db_url = run.runtime.database_url.get_secret_value()
        rows_before = rows(db_url)
        spent, resident, took = cpu_spent(args.seconds)
        rows_after = rows(db_url)
        busy = sum(spent.values())
        out("")
        out(
            f"{args.streams} {args.backend} streams at {args.fps:g} fps, imgsz {args.imgsz}, "
            f"{os.cpu_count()} cores: {(rows_after - rows_before) / took:.2f} rows/s stored of "
            f"{args.streams * args.fps:g} frames/s asked; {busy / took:.2f} cores busy"
        )
        out(f"{'process group':32} {'% of a core':>12} {'% of busy':>10} {'RSS MB':>8}")
        for name, seconds in sorted(spent.items(), key=lambda item: -item[1]):
            out(
                f"{name:32} {seconds / took * 100:12.1f} {seconds / busy * 100:10.1f}"
                f" {resident[name] / 2**20:8.0f}"
            )
        for stream_id in ids:
            client.shutdown(stream_id)


if __name__ == "__main__":
    main()
