"""Runner benchmark (not a test): frames published per second, CPU per stream, RSS per process.

Starts the test camera, a throw-away memory-mode broker (unless ``--bootstrap`` names one) and the
runner as its own OS process (``python -m workers.runner.service``), then for 1 and for 4 streams
starts the streams, waits until every one has published, and measures over a window:

- frames/s published per stream (from the frames topic, by capture time),
- CPU of each capture process and of the runner itself (% of one core),
- RSS of each capture process and of the runner.

    .venv/bin/python benchmarks/runner_bench.py [--streams 1 4] [--seconds 20] [--fps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from aiokafka import AIOKafkaConsumer

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from core.kafka import create_producer, ensure_topics  # noqa: E402
from core.messages import FrameHeaders, StartCommand, StateEvent, StopCommand, StreamOptions  # noqa: E402
from core.sealing import UrlSealer, generate_key  # noqa: E402
from core.settings import Settings, settings_env  # noqa: E402
from core.states import StreamState  # noqa: E402
from deploy import servers  # noqa: E402
from deploy.camera.control import TestCamera  # noqa: E402


@dataclass
class ScenarioResult:
    streams: int
    requested_fps: float
    window_s: float
    fps_per_stream: list[float]
    fps_total: float
    capture_cpu_percent: list[float]  # per capture process, % of one core
    capture_rss_mib: list[float]
    runner_cpu_percent: float
    runner_rss_mib: float


def runner_env(settings: Settings) -> dict[str, str]:
    return {**os.environ, **settings_env(settings), "LOOKOUT_LOG_LEVEL": "WARNING"}


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def capture_children(runner: psutil.Process) -> list[psutil.Process]:
    found = []
    for child in runner.children():
        with contextlib.suppress(psutil.Error):
            if any("spawn_main" in part for part in child.cmdline()):
                found.append(child)
    return found


async def run_scenario(
    settings: Settings,
    camera: TestCamera,
    runner: psutil.Process,
    *,
    streams: int,
    fps: float,
    window_s: float,
) -> ScenarioResult:
    producer = create_producer(settings, client_id="runner-bench")
    await producer.start()
    consumer = AIOKafkaConsumer(
        settings.topic_frames,
        settings.topic_states,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,
        max_partition_fetch_bytes=settings.kafka_max_request_size,
    )
    await consumer.start()
    stream_ids = [f"bench-{streams}-{i}-{uuid.uuid4().hex[:6]}" for i in range(streams)]
    mounts = [camera.mounts[i % len(camera.mounts)] for i in range(streams)]
    try:
        for stream_id, mount in zip(stream_ids, mounts, strict=True):
            command = StartCommand(
                stream_id=stream_id,
                url_sealed=UrlSealer(settings).seal(camera.url(mount)),
                options=StreamOptions(fps=fps),
            )
            await producer.send_and_wait(
                settings.topic_commands, command.model_dump_json().encode(), key=stream_id.encode()
            )

        started: set[str] = set()
        frames_at: dict[str, list[float]] = {s: [] for s in stream_ids}

        async def drain() -> None:
            batch = await consumer.getmany(timeout_ms=100)
            for records in batch.values():
                for r in records:
                    key = (r.key or b"").decode()
                    if key not in frames_at:
                        continue
                    if r.topic == settings.topic_states:
                        event = StateEvent.model_validate_json(r.value or b"{}")
                        if event.state == StreamState.RUNNER_STARTED:
                            started.add(key)
                    else:
                        frames_at[key].append(FrameHeaders.from_kafka(list(r.headers)).capture_ts)

        deadline = time.monotonic() + 60
        while len(started) < streams:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(started)} of {streams} streams started")
            await drain()
        warmup_until = time.monotonic() + 3.0
        while time.monotonic() < warmup_until:
            await drain()

        children = capture_children(runner)
        cpu_before = {p.pid: cpu_seconds(p) for p in [runner, *children]}
        window_start_wall, window_start = time.time(), time.monotonic()
        while time.monotonic() - window_start < window_s:
            await drain()
        elapsed = time.monotonic() - window_start
        window_end_wall = window_start_wall + elapsed
        cpu_after = {p.pid: cpu_seconds(p) for p in [runner, *children]}
        rss = {p.pid: p.memory_info().rss / 2**20 for p in [runner, *children]}
        for _ in range(10):  # frames captured inside the window may still be on their way
            await drain()

        counts = Counter(
            {
                s: len([t for t in ts if window_start_wall <= t < window_end_wall])
                for s, ts in frames_at.items()
            }
        )
        fps_per_stream = [round(counts[s] / elapsed, 2) for s in stream_ids]

        for stream_id in stream_ids:
            await producer.send_and_wait(
                settings.topic_commands,
                StopCommand(stream_id=stream_id).model_dump_json().encode(),
                key=stream_id.encode(),
            )
        return ScenarioResult(
            streams=streams,
            requested_fps=fps,
            window_s=round(elapsed, 1),
            fps_per_stream=fps_per_stream,
            fps_total=round(sum(fps_per_stream), 2),
            capture_cpu_percent=[
                round(100 * (cpu_after[p.pid] - cpu_before[p.pid]) / elapsed, 1) for p in children
            ],
            capture_rss_mib=[round(rss[p.pid], 1) for p in children],
            runner_cpu_percent=round(100 * (cpu_after[runner.pid] - cpu_before[runner.pid]) / elapsed, 1),
            runner_rss_mib=round(rss[runner.pid], 1),
        )
    finally:
        await consumer.stop()
        await producer.stop()


async def wait_for_no_children(runner: psutil.Process, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    # The OS offers no event for a process's children going away: poll.
    while capture_children(runner) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.2)


async def run_scenarios(
    settings: Settings, camera: TestCamera, runner: psutil.Process, args: argparse.Namespace
) -> list[ScenarioResult]:
    await ensure_topics(settings, [settings.topic_commands, settings.topic_frames, settings.topic_states])
    results = []
    for streams in args.streams:
        result = await run_scenario(
            settings, camera, runner, streams=streams, fps=args.fps, window_s=args.seconds
        )
        results.append(result)
        await wait_for_no_children(runner)
    return results


def bench(args: argparse.Namespace) -> list[ScenarioResult]:
    """Start the camera, a broker (unless given) and the runner; measure each scenario; clean up."""
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="runner-bench-")))
        bootstrap = args.bootstrap
        if bootstrap is None:
            spec = servers.kafka_broker(
                workdir / "kafka", servers.free_port(), controller_port=servers.free_port()
            )
            broker = spec.start()
            stack.callback(servers.stop_process_group, broker.pid)
            bootstrap = spec.address
        camera = TestCamera(log_dir=workdir).start()
        stack.callback(camera.stop)

        prefix = f"bench{uuid.uuid4().hex[:6]}"
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            kafka_bootstrap=bootstrap,
            secret_key=generate_key(),  # type: ignore[arg-type]
            topic_commands=f"{prefix}.commands",
            topic_frames=f"{prefix}.frames",
            topic_states=f"{prefix}.states",
            kafka_fetch_max_wait_ms=20,
            runner_max_side=args.max_side,
            runner_jpeg_quality=args.jpeg_quality,
        )
        log = stack.enter_context(open(workdir / "runner.log", "wb"))
        runner_proc = subprocess.Popen(
            [sys.executable, "-m", "workers.runner.service"],
            cwd=REPO_ROOT,
            env=runner_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        stack.callback(runner_proc.wait, 15)
        stack.callback(runner_proc.terminate)
        return asyncio.run(run_scenarios(settings, camera, psutil.Process(runner_proc.pid), args))


def report(results: list[ScenarioResult]) -> str:
    lines = [
        "streams  fps req  fps/stream (each)            total fps  CPU/stream %  (each)            "
        "RSS/capture MiB  runner CPU %  runner RSS MiB"
    ]
    for r in results:
        cpu_mean = sum(r.capture_cpu_percent) / max(1, len(r.capture_cpu_percent))
        rss_mean = sum(r.capture_rss_mib) / max(1, len(r.capture_rss_mib))
        lines.append(
            f"{r.streams:>7}  {r.requested_fps:>7}  {r.fps_per_stream!s:<28} {r.fps_total:>9}  "
            f"{cpu_mean:>12.1f}  {r.capture_cpu_percent!s:<18} {rss_mean:>15.1f}  "
            f"{r.runner_cpu_percent:>12}  {r.runner_rss_mib:>14}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window per scenario")
    parser.add_argument("--fps", type=float, default=5.0, help="requested frames per second per stream")
    parser.add_argument("--max-side", type=int, default=1280)
    parser.add_argument("--jpeg-quality", type=int, default=85)
    parser.add_argument("--bootstrap", default=None, help="use this broker instead of a throw-away one")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    results = bench(args)
    sys.stdout.write(report(results))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
