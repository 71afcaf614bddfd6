"""The worker of workers/temporal_worker.py, real activities on a real Postgres, the time-skipping server.

The test plays the runner and ML: it answers each stop command it finds in the outbox with their
acknowledgements, the way they will through the relay and the states topic.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import CancelledError
from temporalio.testing import WorkflowEnvironment

from core.db import create_pool
from core.messages import EventKind, Service, StateEvent, StopCommand, parse_command
from core.settings import Settings
from core.states import StreamState
from core.temporal import STREAM_ID, STREAM_STATE, connect_temporal
from tests.conftest import make_settings
from workers.temporal_worker import build_worker
from workflows.starter import signal_with_start
from workflows.stream_lifecycle import StreamLifecycle

pytestmark = pytest.mark.integration

S = StreamState
SECRET = "hunter2"


@pytest.fixture(scope="module")
def pg_settings(pg_url: str) -> Settings:
    return make_settings(
        database_url=pg_url, temporal_task_queue=f"lifecycle-pg-{uuid.uuid4().hex[:8]}", ack_deadline_s=15.0
    )


@pytest.fixture(scope="module")
async def pool(pg_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(pg_settings)
    yield pool
    await pool.close()


@pytest.fixture(params=["time_skipping", "dev_server"])
async def client(
    request: pytest.FixtureRequest,
    env: WorkflowEnvironment,
    pg_settings: Settings,
    pool: asyncpg.Pool,
) -> AsyncIterator[Client]:
    """A client of the time-skipping server or of a real dev server, with the worker running."""
    if request.param == "time_skipping":
        temporal = env.client
    else:  # the dev server fixture is synchronous, so it can be asked for here
        address: str = request.getfixturevalue("temporal_address")
        temporal = await connect_temporal(pg_settings.model_copy(update={"temporal_address": address}))
    async with build_worker(temporal, pg_settings, pool):
        yield temporal


async def add_stream(pool: asyncpg.Pool) -> str:
    stream_id = uuid.uuid4()
    await pool.execute(
        "INSERT INTO streams (id, url_redacted, url_full, state) VALUES ($1, $2, $3, 'init_startup')",
        stream_id,
        "rtsp://***@cam.local/live",
        f"rtsp://admin:{SECRET}@cam.local/live",
    )
    return str(stream_id)


async def stored_state(pool: asyncpg.Pool, stream_id: str) -> str:
    state: str = await pool.fetchval("SELECT state FROM streams WHERE id = $1", uuid.UUID(stream_id))
    return state


async def wait_for_stored(pool: asyncpg.Pool, stream_id: str, state: StreamState) -> None:
    for _ in range(200):
        if await stored_state(pool, stream_id) == state.value:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{stream_id} never stored {state.value}")


async def answer_stops(client: Client, pool: asyncpg.Pool, stream_id: str, settings: Settings) -> StopCommand:
    """Wait for the stop in the outbox, then acknowledge it as runner and ML."""
    for _ in range(200):
        payload = await pool.fetchval(
            "SELECT payload FROM outbox WHERE key = $1 AND topic = $2 ORDER BY id LIMIT 1",
            stream_id,
            settings.topic_commands,
        )
        if payload is not None:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("no stop command reached the outbox")
    command = parse_command(payload)
    assert isinstance(command, StopCommand)
    for service in (Service.RUNNER, Service.ML):
        ack = StateEvent(stream_id=stream_id, service=service, kind=EventKind.ACK)
        await signal_with_start(client, settings, ack)
    return command


async def test_lifecycle_with_real_activities_stores_every_state_and_queues_the_stop(
    client: Client, pool: asyncpg.Pool, pg_settings: Settings
) -> None:
    sid = await add_stream(pool)
    handle = await signal_with_start(
        client,
        pg_settings,
        StateEvent(stream_id=sid, service=Service.API, kind=EventKind.PROGRESS, state=S.INIT_STARTUP),
    )
    await wait_for_stored(pool, sid, S.IN_STARTUP_PROCESSING)
    for service, state in ((Service.RUNNER, S.RUNNER_STARTED), (Service.ML, S.ML_STARTED)):
        progress = StateEvent(stream_id=sid, service=service, kind=EventKind.PROGRESS, state=state)
        await signal_with_start(client, pg_settings, progress)
    await wait_for_stored(pool, sid, S.ML_STARTED)

    # what the API does on /shutdown: store init_shutdown, then publish the event
    await pool.execute(
        "UPDATE streams SET state = 'init_shutdown', version = version + 1 WHERE id = $1", uuid.UUID(sid)
    )
    shutdown = StateEvent(stream_id=sid, service=Service.API, kind=EventKind.PROGRESS, state=S.INIT_SHUTDOWN)
    await signal_with_start(client, pg_settings, shutdown)
    stop = await answer_stops(client, pool, sid, pg_settings)
    result = await handle.result()

    assert (result.state, result.error_reason) == (S.INACTIVE, None)
    assert stop.reason == "shutdown requested by api"
    rows = await pool.fetch(
        "SELECT to_state, version, event_id FROM stream_events WHERE stream_id = $1 ORDER BY version",
        uuid.UUID(sid),
    )
    assert [(r["to_state"], r["version"]) for r in rows] == [
        ("in_startup_processing", 2),
        ("runner_started", 3),
        ("ml_started", 4),
        # version 5 is the API's init_shutdown (this test wrote no audit row for it)
        ("in_shutdown_processing", 6),
        ("inactive", 7),
    ]
    assert SECRET not in (await handle.fetch_history()).to_json()
    description = await handle.describe()
    assert description.typed_search_attributes.get(STREAM_ID) == sid
    assert description.typed_search_attributes.get(STREAM_STATE) == "inactive"
    assert await description.memo_value("url_redacted") == "rtsp://***@cam.local/live"


async def test_cancel_with_real_activities_stores_a_terminal_state(
    client: Client, pool: asyncpg.Pool, pg_settings: Settings
) -> None:
    sid = await add_stream(pool)
    handle = await signal_with_start(
        client,
        pg_settings,
        StateEvent(stream_id=sid, service=Service.API, kind=EventKind.PROGRESS, state=S.INIT_STARTUP),
    )
    await wait_for_stored(pool, sid, S.IN_STARTUP_PROCESSING)

    await handle.cancel()
    stop = await answer_stops(client, pool, sid, pg_settings)
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()

    assert isinstance(failure.value.cause, CancelledError)
    assert stop.reason == "workflow cancelled"
    assert await stored_state(pool, sid) == "inactive"
    assert (await handle.query(StreamLifecycle.current_state)).state is S.INACTIVE
