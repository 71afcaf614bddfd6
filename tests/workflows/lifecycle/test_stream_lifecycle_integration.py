"""A stream's whole lifecycle on the real Postgres, broker and Temporal dev server.

The API, outbox relay, state bridge and Temporal worker run in-process; scripted participants
answer the start and stop commands the way the runner and ML do.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import asyncpg
import pytest
from temporalio.client import WorkflowExecutionStatus

from core.kafka import create_producer
from core.messages import EventKind, Service, StateEvent, parse_command
from core.states import StreamState
from core.temporal import STREAM_ID, STREAM_STATE
from deploy.servers import venv_bin
from tests.observing import consume, eventually, sample
from tests.running_services import LifecycleStack, wait_for_state
from tests.workflows.lifecycle.conftest import ACK_DEADLINE_S

pytestmark = pytest.mark.integration

TERMINAL = {StreamState.INACTIVE.value, StreamState.INACTIVE_ERROR.value}


def camera_url(behaviour: str = "normal", userinfo: str = "") -> str:
    return f"rtsp://{userinfo}camera.test:8554/{behaviour}/{uuid.uuid4().hex[:8]}"


async def start_running_stream(stack: LifecycleStack, url: str) -> str:
    response = await stack.api.post("/init", json={"url": url})
    assert response.status_code == 202, response.text
    stream_id: str = response.json()["id"]
    await wait_for_state(stack.api, stream_id, StreamState.ML_STARTED.value)
    return stream_id


async def audit_trail(db_pool: asyncpg.Pool, stream_id: str) -> list[str]:
    rows = await db_pool.fetch(
        "SELECT to_state FROM stream_events WHERE stream_id = $1 ORDER BY version", uuid.UUID(stream_id)
    )
    return [r["to_state"] for r in rows]


async def test_init_runs_the_stream_to_ml_started_and_shutdown_ends_it_inactive(
    stack: LifecycleStack, db_pool: asyncpg.Pool
) -> None:
    stream_id = await start_running_stream(stack, camera_url())

    response = await stack.api.post("/shutdown", json={"id": stream_id})
    assert response.status_code == 202 and response.json()["state"] == "init_shutdown"
    view = await wait_for_state(stack.api, stream_id, TERMINAL)

    assert view["state"] == "inactive" and view["error_reason"] is None
    assert await audit_trail(db_pool, stream_id) == [
        "init_startup",
        "in_startup_processing",
        "runner_started",
        "ml_started",
        "init_shutdown",
        "in_shutdown_processing",
        "inactive",
    ]
    again = await stack.api.post("/shutdown", json={"id": stream_id})
    assert again.status_code == 200 and again.json()["state"] == "inactive"


async def test_a_participant_silent_on_stop_ends_the_stream_in_inactive_error_naming_it(
    stack: LifecycleStack,
) -> None:
    stream_id = await start_running_stream(stack, camera_url("silent-ml"))

    await stack.api.post("/shutdown", json={"id": stream_id})
    view = await wait_for_state(stack.api, stream_id, TERMINAL, timeout_s=4 * ACK_DEADLINE_S + 20)

    assert view["state"] == "inactive_error"
    assert "ml" in view["error_reason"] and "runner" not in view["error_reason"]


async def test_a_participant_error_at_startup_compensates_to_inactive_error(stack: LifecycleStack) -> None:
    response = await stack.api.post("/init", json={"url": camera_url("error-runner")})
    stream_id = response.json()["id"]

    view = await wait_for_state(stack.api, stream_id, TERMINAL)

    assert view["state"] == "inactive_error"
    assert "runner" in view["error_reason"]


async def test_temporal_workflow_cancel_runs_the_shutdown_path_to_a_terminal_state_in_postgres(
    stack: LifecycleStack, db_pool: asyncpg.Pool
) -> None:
    stream_id = await start_running_stream(stack, camera_url())
    workflow_id = f"stream-{stream_id}"

    cli = await asyncio.create_subprocess_exec(
        venv_bin("temporal"), "workflow", "cancel", "-w", workflow_id,
        "--address", stack.settings.temporal_address, "--namespace", stack.settings.temporal_namespace,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await cli.communicate()
    assert cli.returncode == 0, output.decode()

    view = await wait_for_state(stack.api, stream_id, TERMINAL)
    assert view["state"] == "inactive"
    assert "in_shutdown_processing" in await audit_trail(db_pool, stream_id)
    handle = stack.temporal.get_workflow_handle(workflow_id)

    async def cancelled() -> bool:
        return (await handle.describe()).status == WorkflowExecutionStatus.CANCELED

    await eventually(cancelled)


async def test_workflow_shows_stream_id_and_state_and_keeps_credentials_out_of_history_memo_and_logs(
    stack: LifecycleStack, caplog: pytest.LogCaptureFixture
) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex[:10]}"
    caplog.set_level(logging.INFO)
    stream_id = await start_running_stream(stack, camera_url(userinfo=f"operator:{secret}@"))
    handle = stack.temporal.get_workflow_handle(f"stream-{stream_id}")

    async def state_attribute_is(state: str) -> bool:
        return (await handle.describe()).typed_search_attributes.get(STREAM_STATE) == state

    await eventually(lambda: state_attribute_is("ml_started"))
    await stack.api.post("/shutdown", json={"id": stream_id})
    await wait_for_state(stack.api, stream_id, TERMINAL)
    await eventually(lambda: state_attribute_is("inactive"))

    description = await handle.describe()
    assert description.typed_search_attributes.get(STREAM_ID) == stream_id
    memo = await description.memo()
    assert memo.get("url_redacted", "").startswith("rtsp://***@camera.test:8554/")
    history = await handle.fetch_history()
    raw = b"".join(event.SerializeToString() for event in history.events)  # payload bytes as stored
    assert stream_id.encode() in raw, "the history should hold the stream's payloads"
    assert secret.encode() not in raw
    assert secret not in history.to_json()
    assert secret not in repr(memo)
    assert secret not in caplog.text


async def test_a_shutdown_whose_message_was_lost_is_completed_by_asking_again(
    stack: LifecycleStack, db_pool: asyncpg.Pool
) -> None:
    stream_id = await start_running_stream(stack, camera_url())
    # the shutdown is stored but its message never reached the lifecycle (a broker that lost it)
    await db_pool.execute(
        "UPDATE streams SET state = 'init_shutdown', version = version + 1 WHERE id = $1",
        uuid.UUID(stream_id),
    )
    await asyncio.sleep(2 * ACK_DEADLINE_S)
    assert (await stack.api.get(f"/state/{stream_id}")).json()["state"] == "init_shutdown", "nothing moves"

    response = await stack.api.post("/shutdown", json={"id": stream_id})

    assert response.status_code == 202 and response.json()["state"] == "init_shutdown"
    view = await wait_for_state(stack.api, stream_id, TERMINAL)
    assert view["state"] == "inactive", view


async def commands_of(stack: LifecycleStack, stream_id: str, *, until: int, linger_s: float) -> list[str]:
    """The kinds of the commands on the commands topic for ``stream_id``, read from the start."""

    def mine(records: list) -> list[str]:  # type: ignore[type-arg]
        return [parse_command(r.value).kind for r in records if r.key == stream_id.encode()]

    records = await consume(
        stack.settings,
        stack.settings.topic_commands,
        until=lambda rs: len(mine(rs)) >= until,
        linger_s=linger_s,
    )
    return mine(records)


async def workflow_runs(stack: LifecycleStack, stream_id: str) -> int:
    return len([w async for w in stack.temporal.list_workflows(f'WorkflowId = "stream-{stream_id}"')])


async def test_a_normal_shutdown_puts_exactly_one_stop_on_the_commands_topic_and_leaves_one_workflow_run(
    stack: LifecycleStack,
) -> None:
    stream_id = await start_running_stream(stack, camera_url())

    await stack.api.post("/shutdown", json={"id": stream_id})
    view = await wait_for_state(stack.api, stream_id, TERMINAL)
    assert view["state"] == "inactive"

    assert await commands_of(stack, stream_id, until=2, linger_s=2.0) == ["start", "stop"]
    # a late event (a repeated acknowledgement) after the end starts no second run
    late = sample("lookout_bridge_events_after_end_total")
    producer = create_producer(stack.settings)
    await producer.start()
    try:
        ack = StateEvent(stream_id=stream_id, service=Service.ML, kind=EventKind.ACK)
        await producer.send_and_wait(
            stack.settings.topic_states, ack.model_dump_json().encode(), key=stream_id.encode()
        )
    finally:
        await producer.stop()
    await eventually(lambda: sample("lookout_bridge_events_after_end_total") > late)
    await eventually(lambda: workflow_runs(stack, stream_id))
    assert await workflow_runs(stack, stream_id) == 1


async def test_a_service_silent_on_stop_gets_its_one_re_send_and_the_stream_one_workflow_run(
    stack: LifecycleStack,
) -> None:
    stream_id = await start_running_stream(stack, camera_url("silent-runner"))

    await stack.api.post("/shutdown", json={"id": stream_id})
    view = await wait_for_state(stack.api, stream_id, TERMINAL, timeout_s=4 * ACK_DEADLINE_S + 20)
    assert view["state"] == "inactive_error" and "runner" in view["error_reason"]

    assert await commands_of(stack, stream_id, until=3, linger_s=2.0) == ["start", "stop", "stop"]
    assert await workflow_runs(stack, stream_id) == 1
