"""``lookout up`` and ``lookout demo``: the embedded stack, every Lookout service, and (demo) a camera.

``up`` runs the system for real cameras until Ctrl-C. ``demo`` also starts the test camera with the
real people clip, starts a stream for it through the API and shows its progress; Ctrl-C shuts the
stream down through the API, waits for ``inactive`` and stops everything it started.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families

from api.client import ApiError, LookoutClient
from core.settings import Settings
from deploy.local_stack import LocalStack, PartStatus
from deploy.supervisor import ServiceSupervisor, Supervised, SupervisedServer

log = logging.getLogger(__name__)

DEMO_MOUNT = "people"


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def service_env(runtime: Settings) -> dict[str, str]:
    """The environment that points a service at the running stack."""
    return {
        "LOOKOUT_DATABASE_URL": runtime.database_url.get_secret_value(),
        "LOOKOUT_KAFKA_BOOTSTRAP": runtime.kafka_bootstrap,
        "LOOKOUT_S3_ENDPOINT": runtime.s3_endpoint,
        "LOOKOUT_TEMPORAL_ADDRESS": runtime.temporal_address,
        "LOOKOUT_TEMPORAL_UI_URL": runtime.temporal_ui_url,
        "LOOKOUT_API_PORT": str(runtime.api_port),
    }


@contextmanager
def _interrupts() -> Iterator[threading.Event]:
    """An event set by Ctrl-C or SIGTERM, so the main loop can shut down in order."""
    stop = threading.Event()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class LookoutRun:
    """Starts the stack and the services; stops, in reverse order, what it started."""

    def __init__(self, settings: Settings) -> None:
        self.stack = LocalStack(settings)
        self.settings = settings
        self.started_parts: list[str] = []
        self.supervisor: ServiceSupervisor | None = None
        self.runtime = settings

    def start(self, api_ready_timeout: float = 180.0) -> LookoutClient:
        _out("starting the embedded stack ...")
        report = self.stack.up()
        _print_parts(report)
        self.started_parts = [p.name for p in report if p.note == "started"]
        db_url = self.stack.database_url()
        self.runtime = self.stack.runtime_settings(db_url)
        log_dir = self.stack.data_dir / "logs"
        watched = [
            SupervisedServer(spec.name, self.stack)
            for spec in self.stack.server_specs()
            if self.stack.recorded_pid(spec.name) is not None
        ]
        self.supervisor = ServiceSupervisor.for_lookout(
            log_dir, env=service_env(self.runtime), servers=watched, on_restart=self._restarted
        )
        self.supervisor.start()
        client = LookoutClient(self.api_url)
        deadline = time.monotonic() + api_ready_timeout
        while not client.ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API is not ready after {api_ready_timeout:.0f}s; see {log_dir}")
            time.sleep(0.5)
        _out(f"services running (logs in {log_dir})")
        self.print_addresses()
        return client

    def _restarted(self, part: Supervised) -> None:
        count = self.stack.record_restart(part.name)
        _out(f"{part.name} had died and was restarted (restart {count})")

    @property
    def api_url(self) -> str:
        return f"http://{self.runtime.api_host}:{self.runtime.api_port}"

    def print_addresses(self) -> None:
        _out(f"  API docs        {self.api_url}/docs")
        _out(f"  web page        {self.api_url}/")
        _out(f"  metrics         {self.api_url}/metrics")
        _out(f"  Temporal Web UI {self.runtime.temporal_ui_url}")

    def stop(self) -> None:
        if self.supervisor is not None:
            _out("stopping the services ...")
            self.supervisor.stop()
        if self.started_parts:
            _out(f"stopping what this run started: {', '.join(self.started_parts)}")
            self.stack.down(only=self.started_parts)


def _print_parts(parts: list[PartStatus]) -> None:
    for p in parts:
        _out(f"  {p.name:<9} {p.address:<48} {'ok' if p.healthy else 'DOWN'}  {p.note}")


def run_up(settings: Settings) -> int:
    """Run the stack and the services until Ctrl-C."""
    run = LookoutRun(settings)
    with _interrupts() as stop:
        try:
            run.start()
            _out("Lookout is up; start a stream with: lookout init rtsp://HOST/PATH   (Ctrl-C stops)")
            stop.wait()
        finally:
            run.stop()
    return 0


async def _stream_counts(db_url: str, stream_id: str) -> tuple[int, int]:
    """Detection rows stored for the stream and the objects in them."""
    conn = await asyncpg.connect(db_url)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS frames, coalesce(sum(jsonb_array_length(objects)), 0) AS objects"
            " FROM detections WHERE stream_id = $1",
            stream_id,
        )
        assert row is not None
        return int(row["frames"]), int(row["objects"])
    finally:
        await conn.close()


def _frames_processed(runtime: Settings, stream_id: str) -> int | None:
    """The stream's processed-frames counter from the ML service's metrics (None when unreadable)."""
    if not runtime.metrics_port_ml:
        return None
    try:
        text = httpx.get(f"http://{runtime.metrics_host}:{runtime.metrics_port_ml}/metrics", timeout=2).text
    except httpx.HTTPError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "lookout_frames_processed_total"
                and sample.labels.get("stream_id") == stream_id
            ):
                return int(sample.value)
    return 0


def run_demo(settings: Settings, fps: float = 5.0) -> int:
    """The main job: stack, services, the test camera and one stream, with progress until Ctrl-C."""
    import asyncio

    from deploy.camera.control import TestCamera

    run = LookoutRun(settings)
    camera = TestCamera(log_dir=settings.data_dir.resolve() / "logs")
    client: LookoutClient | None = None
    stream_id: str | None = None
    with _interrupts() as stop:
        try:
            client = run.start()
            camera.start(port=settings.demo_camera_port, mounts=[DEMO_MOUNT])
            url = camera.url(DEMO_MOUNT)
            _out(f"demo camera: {url} (OpenCV's vtest.avi, people walking, looped)")
            stream = client.init(url, {"fps": fps})
            stream_id = str(stream["id"])
            _out(
                f"stream {stream_id} started: {run.runtime.temporal_ui_url}/namespaces/default/workflows/stream-{stream_id}"
            )
            _out("Ctrl-C shuts the stream down and stops everything")
            db_url = run.runtime.database_url.get_secret_value()
            last = (time.monotonic(), 0)
            while not stop.wait(2.0):
                state = client.state(stream_id)
                stored, objects = asyncio.run(_stream_counts(db_url, stream_id))
                processed = _frames_processed(run.runtime, stream_id)
                now = time.monotonic()
                count = processed if processed is not None else stored
                rate = (count - last[1]) / (now - last[0])
                last = (now, count)
                reason = f"  ({state['error_reason']})" if state.get("error_reason") else ""
                _out(
                    f"state={state['state']:<22} frames processed={processed if processed is not None else '?':<6} "
                    f"stored={stored:<6} objects={objects:<7} fps={rate:4.1f}{reason}"
                )
                if state["state"] in ("inactive", "inactive_error"):
                    break
        finally:
            if client is not None and stream_id is not None:
                _shutdown_stream(client, stream_id)
            camera.stop()
            run.stop()
            if client is not None:
                client.close()
    return 0


def _shutdown_stream(client: LookoutClient, stream_id: str, timeout: float = 30.0) -> None:
    _out(f"shutting down stream {stream_id} ...")
    try:
        client.shutdown(stream_id)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = client.state(stream_id)["state"]
            if state in ("inactive", "inactive_error"):
                _out(f"stream {stream_id}: {state}")
                return
            time.sleep(0.5)
        _out(f"stream {stream_id} not inactive after {timeout:.0f}s")
    except (ApiError, OSError) as exc:
        _out(f"could not shut the stream down cleanly: {exc}")
