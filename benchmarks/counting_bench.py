"""Counting benchmark (not a test): zone and line counts against known truth at 2, 5, 10 and 30 fps.

The project's scenes (deploy/camera/scenes.py) on a 768 x 432 frame with a line down its middle
and a zone with a 3 s dwell: walkers one at a time at 100, 200 and 300 px/s with confidence 0.5,
0.7 and 0.9; groups passing each other at the line (the one behind hidden for a moment); walkers
stopping in the zone. Each is played offline at each frame rate through a simulated detector (the
walkers' boxes with jitter, confidence give or take, 3 % misses, occlusion, a false detection every
20th frame; tests/counting.py), the tracker and the zone and line analytics, and scored walker by
walker against the true events: found, missed and extra crossings, entries, exits and dwells, and
identity switches. Lookout's tracker (workers/ml/tracking.py) beside ultralytics' ByteTrack, which
Lookout ran before. ``--live`` also plays the walkers clip (deploy/camera/walkers.py) through the
real pipeline as ``lookout up`` runs it (the test camera over RTSP, the real model, the default
5 fps) for ``--passes`` passes and scores the events stored against the clip's true ones.

    .venv/bin/python benchmarks/counting_bench.py [--fps 2 5 10 30] [--seeds 3] [--live [--passes 2]]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from deploy.camera.scenes import Scene, dwelling, passing, single_file  # noqa: E402
from tests.counting import CountScore, bytetrack, count_offline, motion_tracker  # noqa: E402

KINDS = ("crossed", "entered", "left", "dwell")
TRACKERS = {"lookout": motion_tracker, "bytetrack": bytetrack}


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def scenes() -> list[tuple[str, Scene, tuple[float, ...]]]:
    """(group, scene, the frame rates it must pass at) of the benchmark."""
    found: list[tuple[str, Scene, tuple[float, ...]]] = []
    for speed in (100.0, 200.0, 300.0):
        must = (2.0, 5.0, 10.0, 30.0) if speed == 100.0 else (5.0, 10.0, 30.0)
        for confidence in (0.5, 0.7, 0.9):
            found.append(("single file", single_file(speed, confidence), must))
    for speed in (100.0, 200.0):
        found.append(("passing", passing(speed, 0.7), ()))
    found.append(("dwelling", dwelling(0.7), (2.0, 5.0, 10.0, 30.0)))
    return found


def cell(score: CountScore, kind: str) -> str:
    true, found, extra = score.true[kind], score.found[kind], score.extra[kind]
    if not true and not extra:
        return "-"
    return f"{found}/{true}" + (f"+{extra}" if extra else "")


def rates(score: CountScore, kinds: tuple[str, ...]) -> tuple[float, float]:
    true = sum(score.true[k] for k in kinds)
    found = sum(score.found[k] for k in kinds)
    extra = sum(score.extra[k] for k in kinds)
    return (found / true if true else 1.0), (extra / true if true else 0.0)


def live(passes: int) -> None:
    """The walkers clip through the whole pipeline: events stored over ``passes`` passes vs the truth."""
    import psycopg

    from benchmarks.throwaway import throwaway_settings
    from cli.run import LookoutRun
    from deploy.camera.control import TestCamera
    from deploy.camera.walkers import clip_seconds, ensure_walkers_clip, first_full_pass, walkers_scene

    scene = walkers_scene()
    (door,), (shop,) = scene.lines, scene.zones
    truth = Counter(
        (e.kind.value, e.shape, e.direction.value if e.direction else None) for e in scene.true_events()
    )
    with throwaway_settings("counting", store_policy="all") as settings:
        run = LookoutRun(settings)
        camera = TestCamera(log_dir=settings.data_dir.parent / "camera")
        try:
            client = run.start()
            camera.start(mounts=[f"walkers={ensure_walkers_clip()}"])
            shapes = {
                "lines": [
                    {"name": door.name, "points": [list(p) for p in door.points], "classes": ["person"]}
                ],
                "zones": [
                    {"name": shop.name, "points": [list(p) for p in shop.points], "classes": ["person"]}
                ],
            }
            stream_id = str(client.init(camera.url("walkers"), {"fps": 5, **shapes})["id"])
            length = clip_seconds(scene)
            db_url = run.runtime.database_url.get_secret_value()
            with psycopg.connect(db_url, autocommit=True) as conn:

                def capture_times() -> tuple[datetime | None, datetime | None]:
                    row = conn.execute(
                        "SELECT min(capture_time), max(capture_time) FROM detections WHERE stream_id = %s",
                        (stream_id,),
                    ).fetchone()
                    return (row[0], row[1]) if row else (None, None)

                detecting_since, _ = capture_times()
                while detecting_since is None:
                    time.sleep(1)
                    detecting_since, _ = capture_times()
                playing_since = camera.started_playing_at("walkers")
                assert playing_since is not None
                # whole passes of the looping clip only: from the first one detection saw from its start
                skip = first_full_pass(scene, playing_since, detecting_since.timestamp())
                first = datetime.fromtimestamp(playing_since + skip * length, UTC)
                end = first + timedelta(seconds=passes * length)
                while (capture_times()[1] or first) < end:
                    time.sleep(1)
                found = conn.execute(
                    "SELECT kind, zone, direction, extract(epoch FROM occurred_at - %s) FROM events"
                    " WHERE stream_id = %s AND occurred_at >= %s AND occurred_at < %s ORDER BY occurred_at",
                    (first, stream_id, first, end),
                ).fetchall()
                frames = conn.execute(
                    "SELECT count(*) FROM detections WHERE stream_id = %s AND capture_time >= %s"
                    " AND capture_time < %s",
                    (stream_id, first, end),
                ).fetchone()
            client.shutdown(stream_id)
        finally:
            camera.stop()
            run.stop()
    events = [tuple(e[:3]) for e in found]
    counted = Counter(events)
    want = Counter({key: n * passes for key, n in truth.items()})
    out("")
    out(f"live: the walkers clip, {passes} whole passes at 5 fps through the real pipeline (lookout up)")
    for key in sorted(want.keys() | counted.keys(), key=str):
        out(f"  {' '.join(k for k in key if k):24} true {want[key]:3d}  counted {counted[key]:3d}")
    processed = frames[0] if frames else 0
    out(f"  frames processed: {processed} of {5 * passes * clip_seconds(scene):.0f} asked")
    verdict = "exact" if counted == want else "differs"
    out(
        f"  {verdict}; the crossings at (s into the first whole pass): "
        + ", ".join(f"{e[3]:.1f} {e[2]}" for e in found if e[0] == "crossed")
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fps", type=float, nargs="+", default=[2.0, 5.0, 10.0, 30.0])
    parser.add_argument("--seeds", type=int, default=3, help="detector noise draws per scene and rate")
    parser.add_argument("--live", action="store_true", help="also the walkers clip through the real pipeline")
    parser.add_argument("--passes", type=int, default=2, help="passes of the clip in the live run")
    args = parser.parse_args()
    started = time.monotonic()
    out(
        f"Counting benchmark, {time.strftime('%Y-%m-%d')}: found/true(+extra) per event kind, summed over {args.seeds} seeds"
    )
    out(
        f"{'scene':36} {'fps':>4} {'tracker':9} {'crossed':>9} {'entered':>9} {'left':>9} {'dwell':>9} {'id sw':>6}"
    )
    judged: dict[str, CountScore] = {name: CountScore() for name in TRACKERS}
    by_fps: dict[tuple[str, float], CountScore] = {}
    for _group, scene, must in scenes():
        for fps in args.fps:
            for name, make in TRACKERS.items():
                total = CountScore()
                for seed in range(args.seeds):
                    total.add(count_offline(scene, fps, make, seed=seed))
                by_fps.setdefault((name, fps), CountScore()).add(total)
                if fps in must:
                    judged[name].add(total)
                out(
                    f"{scene.name:36} {fps:4g} {name:9} "
                    + " ".join(f"{cell(total, k):>9}" for k in KINDS)
                    + f" {total.id_switches:6d}"
                )
    out("")
    out("per frame rate, all scenes (crossings and entries: found %, extra %):")
    for (name, fps), total in sorted(by_fps.items(), key=lambda item: (item[0][1], item[0][0])):
        found, extra = rates(total, ("crossed", "entered"))
        out(
            f"  {fps:4g} fps {name:9}: {100 * found:6.1f} % found, {100 * extra:5.1f} % extra, {total.id_switches} id switches"
        )
    out("")
    out(
        "target (walkers 0.5-0.9 at 100-300 px/s at 5, 10, 30 fps, and at 100 px/s at 2 fps; dwelling at all rates):"
    )
    for name, total in judged.items():
        found, extra = rates(total, ("crossed", "entered"))
        verdict = "meets" if found >= 0.98 and extra <= 0.02 else "misses"
        out(
            f"  {name:9}: crossings and entries {100 * found:.1f} % found (>= 98), {100 * extra:.1f} % extra (<= 2): {verdict}"
        )
    misses = Counter({k: v for k, v in judged["lookout"].missed.items() if v})
    if misses:
        out(f"  lookout missed: {dict(misses)}")
    out(f"({time.monotonic() - started:.0f} s)")
    if args.live:
        live(args.passes)


if __name__ == "__main__":
    main()
