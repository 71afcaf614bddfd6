"""A pipeline whose runner and ML are real OS processes under the services' supervisor, for the
self-healing tests: kill -9 a service or one of its stream processes and watch the lifecycle bring
the stream back. The lifecycle (API, relay, bridge, Temporal worker) runs in-process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from cli.supervisor import ServiceSupervisor, SupervisedService
from core.settings import Settings, settings_env
from tests.e2e.pipeline import TERMINAL, pipeline_settings
from tests.running_services import LifecycleStack, running_lifecycle, wait_for_state

# Short supervision timers, so a test sees a whole recovery in seconds
HEALING = {
    "heartbeat_interval_s": 1.0,
    "liveness_timeout_s": 4.0,
    "runner_reconnect_budget_s": 3.0,
    "camera_retry_s": 15.0,
    "startup_deadline_s": 90.0,
    **{name: 0 for name in Settings.model_fields if name.startswith("metrics_port")},
}
STREAM_OPTIONS = {"fps": 5, "imgsz": 320}
# A capture process whose runner was just killed captures on until its next look at the runner's
# liveness (every 50 ms) and publishes what it holds: only a frame captured this long after a
# break proves that the stream came back.
AFTER_A_BREAK = timedelta(seconds=1)


def service(name: str, settings: Settings, log_dir: Path, instance: str = "") -> SupervisedService:
    """The console script ``name`` with ``settings`` as its environment, logging to ``log_dir``."""
    bindir = Path(sys.executable).parent
    env = {**settings_env(settings), "LOOKOUT_LOG_LEVEL": "INFO"}
    label = f"{name}{instance}"
    # two instances of a service on this host: each a static group member of its own
    env["LOOKOUT_KAFKA_INSTANCE_ID"] = f"test-{label}"
    return SupervisedService(label, [str(bindir / name)], log_dir / f"{label}.log", env)


@dataclass
class HealingPipeline:
    """The lifecycle in-process, the stream-running services as supervised processes."""

    lifecycle: LifecycleStack
    supervisor: ServiceSupervisor
    db: asyncpg.Pool

    @property
    def settings(self) -> Settings:
        return self.lifecycle.settings

    @property
    def api(self) -> httpx.AsyncClient:
        return self.lifecycle.api

    def service(self, name: str) -> SupervisedService:
        return next(s for s in self.supervisor.services if s.name == name)

    def pid_of(self, name: str) -> int:
        proc = self.service(name).proc
        assert proc is not None
        return proc.pid

    def logged_pid(self, service_name: str, event: str, stream_id: str | None) -> int:
        """The pid the newest ``event`` line of ``service_name``'s log gives for ``stream_id`` (None:
        a line about no stream, e.g. the ML service's inference engine)."""
        found = None
        for line in self.service(service_name).log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == event and record.get("stream_id") == stream_id:
                    found = int(record["pid"])
        assert found is not None, f"{service_name} never logged {event!r} for {stream_id}"
        return found

    async def start_stream(self, url: str) -> str:
        response = await self.api.post("/init", json={"url": url, "options": STREAM_OPTIONS})
        assert response.status_code == 202, response.text
        stream_id: str = response.json()["id"]
        view = await wait_for_state(self.api, stream_id, {"ml_started", *TERMINAL}, timeout_s=120)
        assert view["state"] == "ml_started", view
        await self.wait_for_rows(stream_id, after=datetime.now(UTC), timeout_s=60)
        return stream_id

    async def rows_after(self, stream_id: str, after: datetime) -> int:
        """Detection rows of frames captured after ``after``."""
        value = await self.db.fetchval(
            "SELECT count(*) FROM detections WHERE stream_id = $1::uuid AND capture_time > $2",
            stream_id,
            after,
        )
        return int(value)

    async def wait_for_rows(
        self, stream_id: str, *, after: datetime, timeout_s: float, watch_state: bool = False
    ) -> float:
        """Seconds until a row of a frame captured ``AFTER_A_BREAK`` after ``after`` is stored; with
        ``watch_state`` the stored state must stay ``ml_started`` all along (a restarting stream still
        runs)."""
        started = time.monotonic()
        while await self.rows_after(stream_id, after + AFTER_A_BREAK) == 0:
            if watch_state:
                view = await self.view(stream_id)
                assert view["state"] == "ml_started", f"the state moved while healing: {view}"
            assert time.monotonic() - started < timeout_s, f"no new rows for {stream_id} in {timeout_s}s"
            await asyncio.sleep(0.2)
        return time.monotonic() - started

    async def view(self, stream_id: str) -> dict[str, Any]:
        response = await self.api.get(f"/state/{stream_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def newest_frame(self, stream_id: str) -> dict[str, Any]:
        response = await self.api.get("/detection_result", params={"id": stream_id, "limit": 1})
        items: list[dict[str, Any]] = response.json()["items"]
        assert items, "no detection yet"
        return items[0]

    async def shut_down(self, stream_id: str, *, timeout_s: float = 30) -> tuple[dict[str, Any], float]:
        """``POST /shutdown``; the terminal view and the seconds it took."""
        requested = time.monotonic()
        response = await self.api.post("/shutdown", json={"id": stream_id})
        assert response.status_code == 202, response.text
        view = await wait_for_state(self.api, stream_id, TERMINAL, timeout_s=timeout_s)
        return view, time.monotonic() - requested


@contextlib.asynccontextmanager
async def healing_pipeline(
    base: Settings,
    db: asyncpg.Pool,
    log_dir: Path,
    *,
    instances: int = 1,
    supervised: bool = True,
    **overrides: Any,
) -> AsyncIterator[HealingPipeline]:
    """Runner and ML (``instances`` of each) as processes, restarted when they die if ``supervised``."""
    settings = await pipeline_settings(base, **(HEALING | overrides))
    names = [("lookout-runner", f"-{i}" if instances > 1 else "") for i in range(instances)]
    names += [("lookout-ml", f"-{i}" if instances > 1 else "") for i in range(instances)]
    services = [service(name, settings, log_dir, instance) for name, instance in names]
    supervisor = ServiceSupervisor(services, settings=settings)
    if supervised:
        supervisor.start()
    else:
        for one in services:
            one.start()
    try:
        async with running_lifecycle(settings) as lifecycle:
            yield HealingPipeline(lifecycle=lifecycle, supervisor=supervisor, db=db)
    finally:
        await asyncio.to_thread(supervisor.stop)
