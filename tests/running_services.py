"""Lookout's services run in-process for integration and end-to-end tests.

Each ``running_*`` context manager starts one part against the given settings and stops it on
exit: the API (an httpx client with the app's lifespan entered), the outbox relay, the
state-manager bridge, the Temporal worker, and ``running_lifecycle`` with all of them together.
``isolated_settings`` gives a test its own topics and task queue on the session's servers, and
``private_broker`` / ``private_temporal`` give it a server of its own to stop and start again;
``stack_broker`` runs the broker exactly as ``lookout stack up`` does, to kill it with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from temporalio.client import Client

from api.main import create_app
from core.api_keys import Scope, create_key
from core.db import create_pool
from core.kafka import ensure_topics
from core.messages import StateEvent
from core.settings import Settings
from core.temporal import SEARCH_ATTRIBUTES, connect_temporal
from core.timeouts import within
from deploy import servers
from deploy.local_stack import LocalStack
from tests.conftest import make_settings
from workers.consumer_service import ConsumerService
from workers.outbox_relay import OutboxRelay
from workers.state_bridge import bridge_service
from workers.temporal_worker import build_worker
from workflows.starter import signal_with_start


async def isolated_settings(base: Settings, **overrides: Any) -> Settings:
    """``base`` with topics, a task queue and short Kafka sessions of its own; the topics exist."""
    tag = uuid.uuid4().hex[:8]
    settings = base.model_copy(
        update={
            "topic_commands": f"lookout.commands.{tag}",
            "topic_states": f"lookout.states.{tag}",
            "topic_dead_letter": f"lookout.dead-letter.{tag}",
            "topic_events": f"lookout.events.{tag}",
            "topic_live": f"lookout.live.{tag}",
            "temporal_task_queue": f"lookout-lifecycle-{tag}",
            "kafka_group_prefix": f"lookout-{tag}",  # no dead member of another test in its groups
            **overrides,
        }
    )
    await ensure_topics(
        settings, [settings.topic_commands, settings.topic_states, settings.topic_dead_letter]
    )
    return settings


async def new_api_key(settings: Settings, scope: Scope = Scope.ADMIN) -> str:
    """A fresh key of ``scope`` in the settings' database; its token."""
    pool = await create_pool(settings)
    try:
        _key, token = await create_key(pool, name=f"test {scope.value}", scope=scope)
        return token
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def running_api(
    settings: Settings, *, scope: Scope | None = Scope.ADMIN
) -> AsyncIterator[httpx.AsyncClient]:
    """The API app with its lifespan entered, behind an in-process httpx client that sends a new key
    of ``scope`` (None: no key)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        headers = {}
        if scope is not None:
            _key, token = await create_key(app.state.db, name=f"test {scope.value}", scope=scope)
            headers["Authorization"] = f"Bearer {token}"
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://lookout-api", headers=headers
        ) as client:
            yield client


@contextlib.asynccontextmanager
async def _running_task(
    name: str, run: Callable[[asyncio.Event], Coroutine[Any, Any, None]]
) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``run(stop)`` as a task; on exit set ``stop`` and wait for it (re-raising what it raised)."""
    stop = asyncio.Event()
    task = asyncio.create_task(run(stop), name=name)
    try:
        yield task
    finally:
        stop.set()
        await within(task, 30)


@contextlib.asynccontextmanager
async def running_relay(settings: Settings, **options: Any) -> AsyncIterator[OutboxRelay]:
    """An outbox relay with a pool of its own, listening before it is handed out."""
    pool = await create_pool(settings)
    try:
        relay = OutboxRelay(settings, pool, **options)
        async with _running_task("outbox-relay", relay.run):
            await within(relay.listening.wait(), 10)
            yield relay
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def running_bridge(
    settings: Settings,
    *,
    signal_event: Callable[[StateEvent], Awaitable[object]] | None = None,
    group_id: str | None = None,
    **options: Any,
) -> AsyncIterator[ConsumerService]:
    """A state bridge in a group of its own; without ``signal_event`` it signals the real workflow."""
    if signal_event is None:
        client = await connect_temporal(settings)
        signal_event = partial(signal_with_start, client, settings)
    bridge = bridge_service(
        settings, signal_event, group_id=group_id or f"test-bridge-{uuid.uuid4().hex[:8]}", **options
    )
    async with _running_task("state-bridge", bridge.run):
        yield bridge


@contextlib.asynccontextmanager
async def running_temporal_worker(settings: Settings) -> AsyncIterator[Client]:
    """The lifecycle worker on ``settings.temporal_task_queue``; yields its Temporal client."""
    pool = await create_pool(settings)
    try:
        client = await connect_temporal(settings)
        async with build_worker(client, settings, pool):
            yield client
    finally:
        await pool.close()


@dataclass
class LifecycleStack:
    settings: Settings
    api: httpx.AsyncClient
    temporal: Client
    relay: OutboxRelay
    bridge: ConsumerService


@contextlib.asynccontextmanager
async def running_lifecycle(settings: Settings, **relay_options: Any) -> AsyncIterator[LifecycleStack]:
    """API, outbox relay, state bridge and Temporal worker together (participants not included)."""
    async with (
        running_temporal_worker(settings) as temporal,
        running_relay(settings, **relay_options) as relay,
        running_bridge(settings) as bridge,
        running_api(settings) as api,
    ):
        yield LifecycleStack(settings=settings, api=api, temporal=temporal, relay=relay, bridge=bridge)


async def wait_for_state(
    api: httpx.AsyncClient, stream_id: str, states: set[str] | str, timeout_s: float = 30.0
) -> dict[str, Any]:
    """Poll ``GET /state/{id}`` until the stream is in one of ``states``; its last view otherwise fails."""
    wanted = {states} if isinstance(states, str) else states
    deadline = time.monotonic() + timeout_s
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await api.get(f"/state/{stream_id}")
        if response.status_code == 200:
            view = response.json()
            if view["state"] in wanted:
                return view
        await asyncio.sleep(0.2)
    raise AssertionError(f"stream {stream_id} not in {sorted(wanted)} after {timeout_s}s; last view: {view}")


class RestartableServer:
    """A throw-away server of one test, which it may stop and start again on the same port and data."""

    def __init__(self, spec: servers.ServerSpec) -> None:
        self._spec = spec
        self._pid: int | None = None

    @property
    def address(self) -> str:
        return self._spec.address

    def start(self) -> None:
        assert self._pid is None, "already running"
        self._pid = self._spec.start().pid

    def stop(self) -> None:
        if self._pid is not None:
            servers.stop_process_group(self._pid)
            self._pid = None

    async def start_async(self) -> None:
        await asyncio.to_thread(self.start)

    async def stop_async(self) -> None:
        await asyncio.to_thread(self.stop)


@dataclass
class StackBroker:
    """The Kafka broker started from the stack's recipe, as ``lookout stack up`` runs it."""

    stack: LocalStack
    settings: Settings  # Lookout's settings pointing at this broker

    def kill_9(self) -> None:
        """SIGKILL the broker and wait until it is gone."""
        pid = self.stack.recorded_pid("kafka")
        assert pid is not None, "the broker is not running"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while servers.pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> None:
        """Start the broker again on the same port and storage, as ``stack up`` would."""
        self.stack.start_part("kafka")


@contextlib.contextmanager
def stack_broker(data_dir: Path, base: Settings | None = None) -> Iterator[StackBroker]:
    """Kafka exactly as ``lookout stack up`` runs it, on free ports in ``data_dir``."""
    settings = (base or make_settings()).model_copy(
        update={
            "data_dir": data_dir,
            "stack_kafka_port": servers.free_port(),
            "stack_kafka_controller_port": servers.free_port(),
        }
    )
    stack = LocalStack(settings)
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        stack.start_part("kafka", die_with_parent=True)
        yield StackBroker(
            stack, settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{settings.stack_kafka_port}"})
        )
    finally:
        stack.down(only=["kafka"])


def private_broker(data_dir: Path) -> RestartableServer:
    """A Kafka broker of one test in ``data_dir``; restarted, it keeps its topics, records and offsets."""
    return RestartableServer(
        servers.kafka_broker(data_dir / "kafka", servers.free_port(), controller_port=servers.free_port())
    )


def private_temporal(data_dir: Path) -> RestartableServer:
    """A Temporal dev server whose workflows survive a restart (SQLite file in ``data_dir``)."""
    return RestartableServer(
        servers.temporal_dev_server(data_dir, servers.free_port(), None, SEARCH_ATTRIBUTES)
    )
