"""Storage benchmark (not a test): a fixed disk under a byte budget, and what a camera costs a day.

``--mode budget`` (the default): what ``lookout up`` runs, in a temp folder on free ports, with
``storage_budget_bytes`` set to ``--budget-mb``; N streams of the demo clip at ``--fps`` for
``--minutes``. Every ``--sample-s`` it prints the bytes on disk of the S3 data folder, the Postgres
database and the broker's log folder, beside the frames' bytes the janitor accounts and the budget;
at the end, the S3 objects and the rows counted on both sides (with the deletions still pending),
and the janitor's share of the CPU the whole run used (psutil, every process of the stack).

``--mode policies``: one stream per store policy on the same camera clip for ``--minutes``; prints
what each stored per minute and the bytes a camera costs a day under it (extrapolated).

    .venv/bin/python benchmarks/storage_bench.py [--streams 4] [--fps 5] [--imgsz 320]
        [--minutes 30] [--budget-mb 500] [--sample-s 60]
    .venv/bin/python benchmarks/storage_bench.py --mode policies [--minutes 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psycopg
from minio import Minio

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.cpu_breakdown import cpu_seconds, out  # noqa: E402
from benchmarks.throwaway import throwaway_settings  # noqa: E402
from cli.run import LookoutRun  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.storage import create_s3_client  # noqa: E402
from deploy.camera.control import TestCamera  # noqa: E402

MB = 1_000_000


def folder_bytes(path: Path) -> int:
    """Bytes the files under ``path`` take on disk (allocated blocks, as ``du`` counts them)."""
    total = 0
    for file in path.rglob("*"):
        try:
            if file.is_file() and not file.is_symlink():
                total += file.stat().st_blocks * 512
        except OSError:
            continue  # deleted while walking
    return total


def database_figures(db_url: str) -> dict[str, int]:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT pg_database_size(current_database()),"
            " (SELECT coalesce(sum(bytes), 0) FROM stream_storage),"
            " (SELECT coalesce(sum(frames), 0) FROM stream_storage),"
            " (SELECT coalesce(sum(deleted_frames), 0) FROM stream_storage),"
            " (SELECT count(*) FROM detections),"
            " (SELECT count(*) FROM frame_deletions)"
        ).fetchone()
    assert row is not None
    keys = ("database", "accounted", "frames", "deleted", "rows", "pending")
    return dict(zip(keys, (int(v) for v in row), strict=True))


def s3_objects(s3: Minio, bucket: str) -> int:
    return sum(1 for _ in s3.list_objects(bucket, prefix="streams/", recursive=True))


def budget_run(args: argparse.Namespace) -> None:
    overrides: dict[str, Any] = {
        "storage_budget_bytes": args.budget_mb * MB,
        "janitor_interval_s": args.janitor_interval_s,
        "storage_partition_hours": args.partition_hours,
    }
    with throwaway_settings("storage", **overrides) as settings:
        run = LookoutRun(settings)
        camera = TestCamera(log_dir=settings.data_dir.parent / "camera")
        try:
            client = run.start()
            mounts = [f"cam{i + 1}" for i in range(args.streams)]
            camera.start(mounts=mounts)
            options = {"fps": args.fps, "imgsz": args.imgsz}
            ids = [str(client.init(camera.url(m), options)["id"]) for m in mounts]
            runtime: Settings = run.runtime
            db_url = runtime.database_url.get_secret_value()
            data = settings.data_dir
            out(
                f"{len(ids)} streams at {args.fps:g} fps, imgsz {args.imgsz}, budget {args.budget_mb} MB,"
                f" {args.minutes:g} minutes; bytes on disk every {args.sample_s:g} s (MB):"
            )
            out(
                f"{'min':>5} {'frames':>7} {'deleted':>8} {'accounted':>9} {'S3 dir':>7} {'Postgres':>8} {'Kafka':>6} {'total':>7}"
            )
            cpu_before, started = cpu_seconds(), time.monotonic()
            worst = 0
            while (elapsed := time.monotonic() - started) < args.minutes * 60:
                time.sleep(min(args.sample_s, args.minutes * 60 - elapsed))
                db = database_figures(db_url)
                s3_dir, kafka_dir = folder_bytes(data / "s3"), folder_bytes(data / "kafka")
                total = s3_dir + db["database"] + kafka_dir
                worst = max(worst, s3_dir + db["database"])
                out(
                    f"{(time.monotonic() - started) / 60:5.1f} {db['frames']:7d} {db['deleted']:8d}"
                    f" {db['accounted'] / MB:9.1f} {s3_dir / MB:7.1f} {db['database'] / MB:8.1f}"
                    f" {kafka_dir / MB:6.1f} {total / MB:7.1f}"
                )
            took = time.monotonic() - started
            cpu_after = cpu_seconds()
            for stream_id in ids:
                client.shutdown(stream_id)
            time.sleep(args.janitor_interval_s + 5)  # one more pass: the deletions it queued are done
            db = database_figures(db_url)
            objects = s3_objects(create_s3_client(runtime), runtime.s3_bucket_frames)
            spent: dict[str, float] = defaultdict(float)
            for pid, (name, seconds, _rss) in cpu_after.items():
                spent[name] += seconds - cpu_before.get(pid, (name, 0.0, 0))[1]
            busy = sum(spent.values())
            janitor = spent.get("lookout-janitor service", 0.0)
            out("")
            out(
                f"at the end: {db['rows']} rows, {objects} S3 objects, {db['pending']} deletions pending"
                f" ({'equal' if db['rows'] == objects and not db['pending'] else 'NOT equal'})"
            )
            out(
                f"S3 folder + Postgres at most {worst / MB:.1f} MB against a budget of {args.budget_mb} MB of frames"
                f" ({worst / (args.budget_mb * MB):.2f}x); the broker's log is bounded by its own retention"
            )
            out(
                f"janitor: {janitor:.1f} CPU s of {busy:.0f} ({janitor / busy * 100:.2f} % of the stack's CPU,"
                f" {janitor / took * 100:.2f} % of a core)"
            )
        finally:
            camera.stop()
            run.stop()


def policies_run(args: argparse.Namespace) -> None:
    policies = {
        "all": {},
        "objects": {},
        "changes": {},
        "events": {"zones": [{"name": "door", "points": [[0.45, 0], [0.55, 0], [0.55, 1], [0.45, 1]]}]},
    }
    with throwaway_settings("policies") as settings:
        run = LookoutRun(settings)
        camera = TestCamera(log_dir=settings.data_dir.parent / "camera")
        try:
            client = run.start()
            camera.start(mounts=["cam1"])
            ids = {
                policy: str(
                    client.init(
                        camera.url("cam1"), {"fps": args.fps, "imgsz": args.imgsz, "store": policy, **extra}
                    )["id"]
                )
                for policy, extra in policies.items()
            }
            out(
                f"one stream per store policy on the demo clip at {args.fps:g} fps for {args.minutes:g} minutes ..."
            )
            time.sleep(args.minutes * 60)
            for stream_id in ids.values():
                client.shutdown(stream_id)
            db_url = run.runtime.database_url.get_secret_value()
            with psycopg.connect(db_url) as conn:
                figures = {
                    policy: conn.execute(
                        "SELECT count(*), coalesce(sum(bytes), 0), min(capture_time), max(capture_time)"
                        " FROM detections WHERE stream_id = %s",
                        (stream_id,),
                    ).fetchone()
                    for policy, stream_id in ids.items()
                }
            out(f"{'policy':8} {'frames/min':>10} {'KB/frame':>9} {'GB/day':>7}")
            for policy, row in figures.items():
                assert row is not None
                frames, nbytes = int(row[0]), int(row[1])
                per_min = frames / args.minutes
                per_frame = nbytes / frames if frames else 0
                out(
                    f"{policy:8} {per_min:10.1f} {per_frame / 1000:9.1f} {per_min * 1440 * per_frame / 1e9:7.2f}"
                )
        finally:
            camera.stop()
            run.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("budget", "policies"), default="budget")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--fps", type=float, default=5)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--budget-mb", type=int, default=500)
    parser.add_argument("--sample-s", type=float, default=60)
    parser.add_argument("--janitor-interval-s", type=float, default=30)
    parser.add_argument("--partition-hours", type=float, default=24)
    args = parser.parse_args()
    if args.mode == "budget":
        budget_run(args)
    else:
        policies_run(args)


if __name__ == "__main__":
    main()
