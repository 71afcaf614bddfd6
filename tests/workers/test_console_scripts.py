"""The console scripts start, do their job, log JSON lines and stop cleanly on SIGTERM."""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from core.outbox import OutboxMessage, enqueue
from core.settings import Settings
from deploy import servers
from tests.observing import consume, eventually
from tests.running_services import isolated_settings
from tests.service_processes import ServiceProcess, start_service

pytestmark = pytest.mark.integration


@pytest.fixture
async def script_settings(settings: Settings) -> Settings:
    # the metrics tests check the metrics ports; here they stay off, so no fixed port is ever taken
    no_metrics = {f"metrics_port_{name}": 0 for name in ("runner", "ml", "relay", "bridge", "worker")}
    return await isolated_settings(settings, api_port=servers.free_port(), **no_metrics)


@pytest.fixture
async def run_script(script_settings: Settings) -> AsyncIterator[object]:
    started: list[ServiceProcess] = []

    async def start(name: str) -> ServiceProcess:
        started.append(await start_service(name, script_settings))
        return started[-1]

    yield start
    for service in started:
        await service.kill()


def assert_json_lines(service: ServiceProcess, name: str) -> None:
    assert service.lines, f"{name} logged nothing"
    for line in service.lines:
        record = json.loads(line)
        assert record["service"] == name and record["event"]


async def test_lookout_api_serves_health_and_readiness_and_stops_on_sigterm(
    run_script: object, script_settings: Settings
) -> None:
    api = await run_script("lookout-api")  # type: ignore[operator]
    base = f"http://{script_settings.api_host}:{script_settings.api_port}"

    async with httpx.AsyncClient(base_url=base) as http:

        async def healthy() -> bool:
            try:
                return (await http.get("/healthz")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(healthy, timeout_s=30, interval_s=0.2)
        assert (await http.get("/readyz")).status_code == 200

    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells it was signalled
    assert await api.terminate() in (0, -signal.SIGTERM)
    assert api.logged("api started") and api.logged("api stopped")
    assert_json_lines(api, "api")


async def test_lookout_outbox_relay_publishes_a_row_and_stops_on_sigterm(
    run_script: object, script_settings: Settings, db_pool: asyncpg.Pool
) -> None:
    relay = await run_script("lookout-outbox-relay")  # type: ignore[operator]
    key = str(uuid.uuid4())
    async with db_pool.acquire() as conn:
        message = OutboxMessage(
            script_settings.topic_commands, key, b"from the script", f"test:{uuid.uuid4()}"
        )
        await enqueue(conn, [message])

    records = await consume(
        script_settings,
        script_settings.topic_commands,
        until=lambda got: any(r.key == key.encode() for r in got),
    )

    assert [r.value for r in records if r.key == key.encode()] == [b"from the script"]
    assert await relay.terminate() == 0
    assert relay.logged("outbox relay started") and relay.logged("outbox relay stopped")
    assert_json_lines(relay, "outbox-relay")


async def test_lookout_state_bridge_dead_letters_a_malformed_event_and_stops_on_sigterm(
    run_script: object, script_settings: Settings
) -> None:
    from tests.workers.test_state_bridge import publish

    bridge = await run_script("lookout-state-bridge")  # type: ignore[operator]
    await publish(script_settings, b"definitely not a state event")

    dead = await consume(script_settings, script_settings.topic_dead_letter, until=lambda got: len(got) >= 1)

    assert dead[0].value == b"definitely not a state event"
    assert await bridge.terminate() == 0
    assert bridge.logged("malformed record dead-lettered") and bridge.logged("stopped")
    assert_json_lines(bridge, "state-bridge")
