"""Recovery benchmark (not a test): how long a stream is blind after a crash, with the default timers.

Runs what ``lookout up`` runs (the embedded stack and the six services under the supervisor) in a
temp folder on free ports, the test camera, and one stream of the demo clip. Then, one after the
other: kill -9 of the runner service, kill -9 of the ML service, and the whole ``lookout up``
stopped and started again. For each it prints the seconds from the break to the first detection
row of a frame captured after it (the supervisor restarts the service within a second or two; the
lifecycle's watchdog notices the silent stream after ``LOOKOUT_LIVENESS_TIMEOUT_S`` and restarts it).

Then it lets the stream run for ``--minutes`` and reports the Temporal history its heartbeats cost:
events per stream-hour over every run of the workflow, and the longest single run (continue-as-new
keeps each run short).

    .venv/bin/python benchmarks/recovery_bench.py [--minutes 5] [--liveness 20] [--heartbeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.throwaway import throwaway_settings  # noqa: E402
from cli.api_client import LookoutClient  # noqa: E402
from cli.run import LookoutRun  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.temporal import connect_temporal, workflow_id  # noqa: E402
from deploy.camera.control import TestCamera  # noqa: E402


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def first_new_row(client: LookoutClient, stream_id: str, after: datetime, timeout_s: float = 300) -> float:
    """Seconds until a row of a frame captured a second after ``after`` is stored: a capture process
    whose runner was just killed captures on for up to 50 ms (it polls the runner's liveness)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        items = client.results(stream_id, limit=20)["items"]
        if any(datetime.fromisoformat(i["capture_time"]) > after + timedelta(seconds=1) for i in items):
            return time.monotonic() - started
        time.sleep(0.2)
    raise RuntimeError(f"no new row within {timeout_s:.0f}s")


def kill_service(run: LookoutRun, name: str) -> None:
    assert run.supervisor is not None
    proc = next(s.proc for s in run.supervisor.services if s.name == name)
    assert proc is not None
    os.kill(proc.pid, signal.SIGKILL)


async def history_cost(settings: Settings, stream_id: str) -> tuple[int, int, int]:
    """(events over every run, runs, events of the longest run) of the stream's workflow."""
    client = await connect_temporal(settings)
    total, runs, longest = 0, 0, 0
    async for execution in client.list_workflows(f'WorkflowId = "{workflow_id(stream_id)}"'):
        history = await client.get_workflow_handle(execution.id, run_id=execution.run_id).fetch_history()
        total += len(history.events)
        runs += 1
        longest = max(longest, len(history.events))
    return total, runs, longest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--minutes", type=float, default=5.0, help="how long the stream runs for the history figure"
    )
    parser.add_argument("--liveness", type=float, default=Settings.model_fields["liveness_timeout_s"].default)
    parser.add_argument(
        "--heartbeat", type=float, default=Settings.model_fields["heartbeat_interval_s"].default
    )
    args = parser.parse_args()
    with throwaway_settings(
        "recovery", liveness_timeout_s=args.liveness, heartbeat_interval_s=args.heartbeat
    ) as settings:
        camera = TestCamera(log_dir=settings.data_dir.parent / "camera").start(mounts=["cam1"])
        run = LookoutRun(settings)
        try:
            client = run.start()
            stream_id = str(client.init(camera.url("cam1"), {"fps": 5, "imgsz": 640})["id"])
            first_new_row(client, stream_id, datetime.now(UTC))
            results = []
            for name in ("lookout-runner", "lookout-ml"):
                broken = datetime.now(UTC)
                kill_service(run, name)
                results.append((f"kill -9 of {name}", first_new_row(client, stream_id, broken)))
                time.sleep(5)
            broken = datetime.now(UTC)
            run.stop()
            stopped = time.monotonic()
            run = LookoutRun(settings)
            client = run.start()
            back_after = time.monotonic() - stopped
            took = first_new_row(client, stream_id, broken)
            results.append((f"lookout up stopped and started ({back_after:.0f} s to start)", took))
            out("")
            out(
                f"recovery (liveness timeout {args.liveness:g} s, heartbeats every {args.heartbeat:g} s, 2 cores):"
            )
            for what, seconds in results:
                out(f"  {what:<45} first new row after {seconds:5.1f} s")
            started = time.monotonic()
            before = asyncio.run(history_cost(run.runtime, stream_id))
            time.sleep(args.minutes * 60)
            after = asyncio.run(history_cost(run.runtime, stream_id))
            hours = (time.monotonic() - started) / 3600
            per_hour = (after[0] - before[0]) / hours
            out(
                f"Temporal history: {per_hour:,.0f} events per stream-hour from heartbeats;"
                f" {after[1]} runs (continue-as-new), the longest {after[2]} events"
            )
            client.shutdown(stream_id)
        finally:
            camera.stop()
            run.stop()


if __name__ == "__main__":
    main()
