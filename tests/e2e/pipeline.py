"""The whole pipeline in-process for end-to-end tests, and the API served over real HTTP.

``running_pipeline`` runs the real runner and ML (YOLO) services beside the lifecycle (API, outbox
relay, state bridge, Temporal worker) on the session's servers; each stream's capture and detection
run in OS processes of their own, descendants of the test process. ``served_api`` puts the API
behind uvicorn on a socket, for a browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import httpx
import psutil
import uvicorn

from api.main import create_app
from core.settings import Settings
from tests.running_services import LifecycleStack, isolated_settings, running_lifecycle
from workers.ml.preload import wait_until_preloaded
from workers.ml.service import MLHandler, ml_service
from workers.runner.service import RunnerHandler, runner_service

TERMINAL = {"inactive", "inactive_error"}


async def pipeline_settings(base: Settings, **overrides: Any) -> Settings:
    """``base`` with topics and a task queue of its own and the runner's timeouts short for tests."""
    return await isolated_settings(
        base,
        **{
            "topic_frames": f"lookout.frames.{uuid.uuid4().hex[:8]}",
            "kafka_fetch_max_wait_ms": 20,
            "runner_max_side": 640,
            "runner_open_timeout_ms": 2000,
            "runner_read_timeout_ms": 2000,
            "runner_reconnect_budget_s": 3.0,
            **overrides,
        },
    )


@dataclass
class Pipeline:
    """The running services of one pipeline; ``api`` talks to its API in-process."""

    lifecycle: LifecycleStack
    runner: RunnerHandler
    ml: MLHandler

    @property
    def settings(self) -> Settings:
        return self.lifecycle.settings

    @property
    def api(self) -> httpx.AsyncClient:
        return self.lifecycle.api

    def stream_pids(self, stream_id: str) -> dict[str, int]:
        """The OS processes the runner and ML hold for a stream now, by service."""
        pids: dict[str, int] = {}
        capture = self.runner.streams.get(stream_id)
        if capture is not None and capture.pid is not None:
            pids["runner"] = capture.pid
        detection = self.ml.streams.get(stream_id)
        if detection is not None and detection.pid is not None:
            pids["ml"] = detection.pid
        return pids


def living_children() -> set[int]:
    """Pids of this process's descendants that still run (zombies count as gone)."""
    alive = set()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.add(child.pid)
    return alive


@contextlib.asynccontextmanager
async def running_pipeline(settings: Settings) -> AsyncIterator[Pipeline]:
    """Lifecycle, runner and ML on ``settings``, each in consumer groups of its own."""
    tag = uuid.uuid4().hex[:8]
    runner = runner_service(settings, group_id=f"e2e-runner-{tag}")
    runner_task = asyncio.create_task(runner.run(), name="runner")
    try:
        async with (
            ml_service(settings, group_id=f"e2e-ml-{tag}") as ml,
            running_lifecycle(settings) as lifecycle,
        ):
            await asyncio.to_thread(wait_until_preloaded)  # ML is ready for streams from here on
            yield Pipeline(
                lifecycle=lifecycle,
                runner=cast(RunnerHandler, runner.handler),
                ml=cast(MLHandler, ml.handler),
            )
    finally:
        runner_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner_task


@contextlib.asynccontextmanager
async def served_api(settings: Settings) -> AsyncIterator[str]:
    """``create_app(settings)`` behind uvicorn on a free port, in a thread with its own event loop."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), log_config=None, access_log=False, timeout_graceful_shutdown=5)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="api-http", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API did not start serving HTTP")
            await asyncio.sleep(0.05)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await asyncio.to_thread(thread.join, 30)
        sock.close()
