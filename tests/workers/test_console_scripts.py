"""The console scripts start, do their job, log JSON lines and stop cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from pydantic import SecretStr

from core.outbox import OutboxMessage, enqueue
from core.settings import Settings
from deploy import servers
from tests.observing import consume, eventually
from tests.running_services import isolated_settings

pytestmark = pytest.mark.integration


def settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as the LOOKOUT_* environment a service process reads."""
    env = {}
    for name, value in settings.model_dump().items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"LOOKOUT_{name.upper()}"] = str(value)
    return env


class ServiceProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.lines.append(line.decode().rstrip("\n"))

    def logged(self, event: str) -> bool:
        return any(f'"event": "{event}"' in line for line in self.lines)

    async def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), 30)
        await self._reader
        return code


@pytest.fixture
async def script_settings(settings: Settings) -> Settings:
    return await isolated_settings(settings, api_port=servers.free_port())


@pytest.fixture
async def run_script(script_settings: Settings) -> AsyncIterator[object]:
    started: list[ServiceProcess] = []

    async def start(name: str) -> ServiceProcess:
        proc = await asyncio.create_subprocess_exec(
            servers.venv_bin(name),
            env={**os.environ, **settings_env(script_settings), "LOOKOUT_LOG_LEVEL": "INFO"},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        started.append(ServiceProcess(proc))
        return started[-1]

    yield start
    for service in started:
        if service.proc.returncode is None:
            service.proc.kill()
            await service.proc.wait()


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
    assert bridge.logged("malformed state event skipped") and bridge.logged("state bridge stopped")
    assert_json_lines(bridge, "state-bridge")
