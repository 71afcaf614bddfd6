"""Soak benchmark (not a test): N streams for M minutes on the embedded stack, then shut down; counts
every state event.

Runs what ``lookout up`` runs, in a temp folder on free ports: the stack (the machine's Postgres with
a database of its own, SeaweedFS, Apache Kafka, Temporal) and Lookout's
services under the supervisor; the test camera serves the demo clip on one mount per stream. After
the window every stream is shut down through the API. Then, per stream:

- its end state (every one must be terminal, and ``inactive``);
- the state events published: by the outbox (rows sent to the states topic) and by the runner
  and ML (each logs ``state event published`` with the event id once the broker acknowledged it);
- how many of those are on the states topic, read back from the start; ``lost`` must be 0.

    .venv/bin/python benchmarks/soak_bench.py [--streams 6] [--minutes 10] [--fps 5] [--imgsz 640]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import asyncpg
import psycopg

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.throwaway import throwaway_settings  # noqa: E402
from cli.run import LookoutRun  # noqa: E402
from core.kafka import create_consumer  # noqa: E402
from core.settings import Settings  # noqa: E402
from deploy.camera.control import TestCamera  # noqa: E402

TERMINAL = ("inactive", "inactive_error")


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def published_by_services(log_dir: Path) -> dict[str, set[str]]:
    """Event ids the runner and ML logged as published (acknowledged by the broker), by stream."""
    found: dict[str, set[str]] = defaultdict(set)
    for name in ("lookout-runner.log", "lookout-ml.log"):
        path = log_dir / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if '"state event published"' not in line:
                continue
            record = json.loads(line)
            found[record["stream_id"]].add(record["event_id"])
    return found


async def published_by_outbox(
    db_url: str, topic: str, stream_ids: list[str]
) -> tuple[dict[str, set[str]], int]:
    """Event ids of the outbox rows sent to the states topic, by stream; and how many rows are unsent."""
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch(
            "SELECT key, payload, sent_at FROM outbox WHERE key = ANY($1::text[])", stream_ids
        )
        unsent = sum(1 for r in rows if r["sent_at"] is None)
        rows = await conn.fetch(
            "SELECT key, payload FROM outbox WHERE key = ANY($1::text[]) AND topic = $2 AND sent_at IS NOT NULL",
            stream_ids,
            topic,
        )
    finally:
        await conn.close()
    found: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        found[r["key"]].add(json.loads(r["payload"])["event_id"])
    return found, unsent


async def on_states_topic(settings: Settings, expected: dict[str, set[str]]) -> dict[str, set[str]]:
    """Event ids of the streams' records on the states topic, read from the start by a new group until
    every expected one is found or nothing new came for 15 s (heartbeats are there too: a count of
    records would stop the read early)."""
    consumer = create_consumer(settings, settings.topic_states, group_id=f"soak-{uuid.uuid4().hex[:8]}")
    await consumer.start()
    found: dict[str, set[str]] = defaultdict(set)
    try:
        last_new = time.monotonic()
        while any(ids - found[s] for s, ids in expected.items()) and time.monotonic() - last_new < 15:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    key = (record.key or b"").decode()
                    if key in expected:
                        found[key].add(json.loads(record.value or b"{}")["event_id"])
                        last_new = time.monotonic()
    finally:
        await consumer.stop()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=6)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--fps", type=float, default=5)
    parser.add_argument("--imgsz", type=int, default=640)
    args = parser.parse_args()
    # the states topic keeps days: every state event is still there when it is counted at the end
    with throwaway_settings("soak", ml_imgsz=args.imgsz) as settings:
        run = LookoutRun(settings)
        camera = TestCamera(log_dir=settings.data_dir.parent / "camera")
        try:
            client = run.start()
            mounts = [f"cam{i + 1}" for i in range(args.streams)]
            camera.start(mounts=mounts)
            started = time.monotonic()
            ids = [
                str(client.init(camera.url(m), {"fps": args.fps, "imgsz": args.imgsz})["id"]) for m in mounts
            ]
            out(f"{len(ids)} streams started; soaking for {args.minutes:g} min ...")
            while time.monotonic() - started < args.minutes * 60:
                time.sleep(30)
                states = [client.state(s)["state"] for s in ids]
                out(f"  {time.monotonic() - started:5.0f} s: {', '.join(sorted(set(states)))}")
            for stream_id in ids:
                client.shutdown(stream_id)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                states = {s: client.state(s) for s in ids}
                if all(v["state"] in TERMINAL for v in states.values()):
                    break
                time.sleep(1)
            runtime = run.runtime
            db_url = runtime.database_url.get_secret_value()
            outbox, unsent = asyncio.run(published_by_outbox(db_url, runtime.topic_states, ids))
            services = published_by_services(settings.data_dir.resolve() / "logs")
            expected = {s: outbox[s] | services[s] for s in ids}
            topic = asyncio.run(on_states_topic(runtime, expected))
            out("")
            out(f"{'stream':38} {'end state':15} {'outbox':>6} {'services':>8} {'on topic':>8} {'lost':>5}")
            lost_total = 0
            for s in ids:
                lost = len(expected[s] - topic[s])
                lost_total += lost
                out(
                    f"{s:38} {states[s]['state']:15} {len(outbox[s]):6} {len(services[s]):8}"
                    f" {len(expected[s] & topic[s]):8} {lost:5}"
                )
            rows = psycopg.connect(db_url).execute("SELECT count(*) FROM detections").fetchone()
            out("")
            out(
                f"{args.streams} streams x {args.minutes:g} min at {args.fps:g} fps, imgsz {args.imgsz}:"
                f" {rows[0] if rows else 0} detection rows; unsent outbox rows {unsent}; lost state events"
                f" {lost_total}; terminal {sum(v['state'] in TERMINAL for v in states.values())}/{len(ids)}"
            )
        finally:
            camera.stop()
            run.stop()


if __name__ == "__main__":
    main()
