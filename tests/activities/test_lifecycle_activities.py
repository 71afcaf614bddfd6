"""The lifecycle activities against a real, freshly migrated Postgres."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from temporalio.testing import ActivityEnvironment

from activities.lifecycle import LifecycleActivities
from activities.models import StateChange
from core.db import create_pool
from core.messages import StopCommand, parse_command
from core.outbox import command_dedupe_key
from core.settings import Settings
from core.states import StreamState
from tests.conftest import make_settings

pytestmark = pytest.mark.integration

S = StreamState
SECRET = "hunter2"


@pytest.fixture(scope="module")
def pg_settings(pg_url: str) -> Settings:
    """Settings for Postgres only: these tests need none of the other servers."""
    return make_settings(database_url=pg_url)


@pytest.fixture(scope="module")
async def pool(pg_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(pg_settings)
    yield pool
    await pool.close()


@pytest.fixture
def acts(pool: asyncpg.Pool, pg_settings: Settings) -> LifecycleActivities:
    return LifecycleActivities(pool, pg_settings)


async def add_stream(pool: asyncpg.Pool, state: StreamState = S.INIT_STARTUP) -> str:
    stream_id = uuid.uuid4()
    await pool.execute(
        "INSERT INTO streams (id, url_redacted, url_full, state) VALUES ($1, $2, $3, $4)",
        stream_id,
        "rtsp://***@cam.local/live",
        f"rtsp://admin:{SECRET}@cam.local/live",
        state.value,
    )
    return str(stream_id)


async def audit(pool: asyncpg.Pool, stream_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT from_state, to_state, version, reason, source, event_id FROM stream_events"
        " WHERE stream_id = $1 ORDER BY version",
        uuid.UUID(stream_id),
    )
    return rows


async def stored(pool: asyncpg.Pool, stream_id: str) -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT state, version, error_reason FROM streams WHERE id = $1", uuid.UUID(stream_id)
    )
    assert row is not None
    return row


async def test_load_stream_returns_the_redacted_url_and_state_never_the_full_url(
    acts: LifecycleActivities, pool: asyncpg.Pool
) -> None:
    sid = await add_stream(pool)

    record = await ActivityEnvironment().run(acts.load_stream, sid)

    assert record is not None
    assert (record.url_redacted, record.state, record.error_reason) == (
        "rtsp://***@cam.local/live",
        S.INIT_STARTUP,
        None,
    )
    assert SECRET not in record.model_dump_json()


async def test_load_stream_of_an_unknown_or_malformed_id_is_none(acts: LifecycleActivities) -> None:
    env = ActivityEnvironment()
    assert await env.run(acts.load_stream, str(uuid.uuid4())) is None
    assert await env.run(acts.load_stream, "not-a-uuid") is None


async def test_record_state_advances_the_version_and_writes_one_audit_row_per_change(
    acts: LifecycleActivities, pool: asyncpg.Pool
) -> None:
    sid = await add_stream(pool)
    env = ActivityEnvironment()

    first = await env.run(acts.record_state, StateChange(stream_id=sid, state=S.IN_STARTUP_PROCESSING))
    second = await env.run(
        acts.record_state, StateChange(stream_id=sid, state=S.ML_STARTED, event_id="e-ml", source="ml")
    )

    assert (first.applied, first.state, first.version) == (True, S.IN_STARTUP_PROCESSING, 2)
    assert (second.applied, second.state, second.version) == (True, S.ML_STARTED, 3)
    assert [tuple(row) for row in await audit(pool, sid)] == [
        ("init_startup", "in_startup_processing", 2, None, "lifecycle", None),
        ("in_startup_processing", "ml_started", 3, None, "ml", "e-ml"),
    ]


async def test_retried_record_state_is_a_no_op(acts: LifecycleActivities, pool: asyncpg.Pool) -> None:
    sid = await add_stream(pool)
    change = StateChange(stream_id=sid, state=S.RUNNER_STARTED, event_id="e-runner")
    env = ActivityEnvironment()

    await env.run(acts.record_state, change)
    retried = await env.run(acts.record_state, change)

    assert (retried.applied, retried.state, retried.version) == (False, S.RUNNER_STARTED, 2)
    assert len(await audit(pool, sid)) == 1


async def test_record_state_never_moves_backwards_nor_out_of_a_terminal_state(
    acts: LifecycleActivities, pool: asyncpg.Pool
) -> None:
    sid = await add_stream(pool, S.ML_STARTED)
    env = ActivityEnvironment()

    late = await env.run(acts.record_state, StateChange(stream_id=sid, state=S.RUNNER_STARTED))
    failed = await env.run(
        acts.record_state, StateChange(stream_id=sid, state=S.INACTIVE_ERROR, reason="ml error: boom")
    )
    after_end = await env.run(acts.record_state, StateChange(stream_id=sid, state=S.INACTIVE))

    assert (late.applied, late.state) == (False, S.ML_STARTED)
    assert failed.applied
    assert (after_end.applied, after_end.state) == (False, S.INACTIVE_ERROR)
    row = await stored(pool, sid)
    assert (row["state"], row["version"], row["error_reason"]) == ("inactive_error", 2, "ml error: boom")
    assert [row["to_state"] for row in await audit(pool, sid)] == ["inactive_error"]


async def test_concurrent_writes_of_one_stream_serialize_on_its_row(
    acts: LifecycleActivities, pool: asyncpg.Pool
) -> None:
    sid = await add_stream(pool)
    env = ActivityEnvironment()
    changes = [StateChange(stream_id=sid, state=state) for state in (S.RUNNER_STARTED, S.ML_STARTED)] * 3

    results = await asyncio.gather(*(env.run(acts.record_state, change) for change in changes))

    row = await stored(pool, sid)
    assert row["state"] == "ml_started"
    rows = await audit(pool, sid)
    assert len(rows) == sum(result.applied for result in results) == row["version"] - 1
    assert [r["version"] for r in rows] == list(range(2, row["version"] + 1))


async def test_record_state_of_an_unknown_stream_is_not_applied(acts: LifecycleActivities) -> None:
    result = await ActivityEnvironment().run(
        acts.record_state, StateChange(stream_id=str(uuid.uuid4()), state=S.INACTIVE)
    )
    assert (result.applied, result.state) == (False, None)


async def test_send_command_queues_the_stop_once_in_the_outbox(
    acts: LifecycleActivities, pool: asyncpg.Pool, pg_settings: Settings
) -> None:
    sid = await add_stream(pool)
    stop = StopCommand(command_id=str(uuid.uuid4()), stream_id=sid, reason="shutdown requested by api")
    env = ActivityEnvironment()

    assert await env.run(acts.send_command, stop) is True
    assert await env.run(acts.send_command, stop) is False  # a retry after a lost result
    assert await env.run(acts.send_command, stop.model_copy(update={"command_id": str(uuid.uuid4())}))

    rows = await pool.fetch(
        "SELECT topic, key, payload, dedupe_key, sent_at FROM outbox WHERE key = $1 ORDER BY id", sid
    )
    assert len(rows) == 2
    first = rows[0]
    assert (first["topic"], first["key"], first["dedupe_key"], first["sent_at"]) == (
        pg_settings.topic_commands,
        sid,
        command_dedupe_key(stop.command_id),
        None,
    )
    assert parse_command(first["payload"]) == stop
