"""StreamLifecycle on the time-skipping test server, with in-memory activities playing Postgres,
the outbox, the runner and ML. Every path of DESIGN.md "Lifecycle states" has a test here.

``LOOKOUT_RECORD_HISTORIES=1`` writes each test's history to ``histories/`` for the replay test.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import CancelledError, WorkflowAlreadyStartedError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from core.messages import ErrorKind, EventKind, Service
from core.settings import Settings
from core.states import StreamState
from core.temporal import STREAM_ID, STREAM_STATE, workflow_id
from tests.conftest import make_settings
from tests.workflows.driving import (
    Handle,
    event,
    init_shutdown,
    init_startup,
    record_history,
    send,
    wait_for,
    wait_for_state,
)
from tests.workflows.fakes import SECRET, FakeLifecycleStore
from workflows.models import LifecycleParams
from workflows.starter import lifecycle_params
from workflows.stream_lifecycle import MEMO_URL, StreamLifecycle

S = StreamState


@pytest.fixture
def settings() -> Settings:
    """Lifecycle settings on a task queue of this test; shadows the session ``settings`` of
    tests/conftest.py on purpose, since these tests need none of its real servers."""
    return make_settings(
        temporal_task_queue=f"lifecycle-{uuid.uuid4().hex[:8]}", startup_deadline_s=60.0, ack_deadline_s=15.0
    )


@pytest.fixture
def client(env: WorkflowEnvironment) -> Client:
    return env.client


@pytest.fixture
async def store(client: Client, settings: Settings) -> AsyncIterator[FakeLifecycleStore]:
    """The fake activities, served with the real workflow by a worker on the test's task queue."""
    fake = FakeLifecycleStore(client)
    async with Worker(
        client,
        task_queue=settings.temporal_task_queue,
        workflows=[StreamLifecycle],
        activities=fake.activities,
    ):
        yield fake


async def test_happy_path_runs_then_shuts_down_to_inactive_with_one_stop(
    client: Client, settings: Settings, store: FakeLifecycleStore
) -> None:
    sid = store.add_stream()
    handle = await send(client, settings, init_startup(sid))
    assert handle.id == workflow_id(sid)
    await wait_for_state(handle, S.IN_STARTUP_PROCESSING)
    await send(client, settings, event(sid, Service.RUNNER, state=S.RUNNER_STARTED))
    await send(client, settings, event(sid, Service.ML, state=S.ML_STARTED))
    running = await wait_for_state(handle, S.ML_STARTED)
    assert running.error_reason is None

    await send(client, settings, init_shutdown(sid))
    result = await handle.result()

    assert result.state is S.INACTIVE
    assert result.error_reason is None
    assert result.acknowledged == [Service.ML, Service.RUNNER]
    stream = store.streams[sid]
    assert stream.states == [
        S.IN_STARTUP_PROCESSING,
        S.RUNNER_STARTED,
        S.ML_STARTED,
        S.INIT_SHUTDOWN,
        S.IN_SHUTDOWN_PROCESSING,
        S.INACTIVE,
    ]
    assert [c.source for c in stream.changes[1:3]] == ["runner", "ml"]
    assert len(store.stops(sid)) == 1
    assert store.stops(sid)[0].reason == "shutdown requested by api"

    description = await handle.describe()
    assert description.typed_search_attributes.get(STREAM_ID) == sid
    assert description.typed_search_attributes.get(STREAM_STATE) == S.INACTIVE.value
    assert await description.memo_value(MEMO_URL) == "rtsp://***@cam.local:8554/live"
    history = (await handle.fetch_history()).to_json()
    assert SECRET not in history and "admin" not in history, "credentials reached a Temporal payload"
    await record_history(client, handle, "happy_path")


async def test_startup_deadline_compensates_with_stops_and_ends_in_inactive_error(
    client: Client, time_skipping: WorkflowEnvironment, settings: Settings, store: FakeLifecycleStore
) -> None:
    sid = store.add_stream()
    handle = await send(
        client, settings, init_startup(sid), event(sid, Service.RUNNER, state=S.RUNNER_STARTED)
    )
    await wait_for_state(handle, S.RUNNER_STARTED)

    result = await handle.result()  # the test server skips time to the deadline

    assert result.state is S.INACTIVE_ERROR
    assert result.error_reason is not None
    assert result.error_reason.startswith("startup deadline: not running within 60s")
    assert store.streams[sid].states[-3:] == [S.INIT_SHUTDOWN, S.IN_SHUTDOWN_PROCESSING, S.INACTIVE_ERROR]
    assert store.streams[sid].error_reason == result.error_reason
    assert len(store.stops(sid)) == 1
    await record_history(client, handle, "startup_deadline")


async def test_silent_service_gets_one_resent_stop_then_inactive_error_names_it(
    client: Client, time_skipping: WorkflowEnvironment, settings: Settings, store: FakeLifecycleStore
) -> None:
    store.answers = {Service.RUNNER: 1}  # ML never answers
    sid = store.add_stream()
    handle = await send(
        client,
        settings,
        init_startup(sid),
        event(sid, Service.RUNNER, state=S.RUNNER_STARTED),
        event(sid, Service.ML, state=S.ML_STARTED),
    )
    await wait_for_state(handle, S.ML_STARTED)
    await send(client, settings, init_shutdown(sid))

    result = await handle.result()

    assert result.state is S.INACTIVE_ERROR
    assert result.error_reason == "no stop acknowledgement from ml within 15s of a re-sent stop"
    assert len(store.stops(sid)) == 2, "stop is re-sent exactly once"
    assert result.acknowledged == [Service.RUNNER]
    await record_history(client, handle, "ack_deadline_silent_ml")


async def test_service_answering_only_the_resent_stop_ends_inactive(
    client: Client, time_skipping: WorkflowEnvironment, settings: Settings, store: FakeLifecycleStore
) -> None:
    store.answers = {Service.RUNNER: 1, Service.ML: 2}  # ML misses the first stop
    sid = store.add_stream()
    handle = await send(client, settings, init_startup(sid), event(sid, Service.ML, state=S.ML_STARTED))
    await wait_for_state(handle, S.ML_STARTED)
    await send(client, settings, init_shutdown(sid))

    result = await handle.result()

    assert (result.state, result.error_reason) == (S.INACTIVE, None)
    assert len(store.stops(sid)) == 2


async def test_fatal_service_error_while_running_compensates_to_inactive_error(
    client: Client, settings: Settings, store: FakeLifecycleStore
) -> None:
    sid = store.add_stream()
    handle = await send(
        client,
        settings,
        init_startup(sid),
        event(sid, Service.RUNNER, state=S.RUNNER_STARTED),
        event(sid, Service.ML, state=S.ML_STARTED),
    )
    await wait_for_state(handle, S.ML_STARTED)
    fatal = event(sid, Service.ML, EventKind.ERROR, error="model failed to load", error_kind=ErrorKind.FATAL)
    await send(client, settings, fatal)

    result = await handle.result()

    assert result.state is S.INACTIVE_ERROR
    assert result.error_reason == "ml error: model failed to load"
    assert store.streams[sid].states[-3:] == [S.INIT_SHUTDOWN, S.IN_SHUTDOWN_PROCESSING, S.INACTIVE_ERROR]
    assert store.streams[sid].changes[-3].reason == "supervision gave up"
    assert len(store.stops(sid)) == 1
    assert store.restarts_of(sid) == [], "no restart can help a fatal error"
    await record_history(client, handle, "fatal_error_while_running")


async def test_service_error_while_starting_compensates_to_inactive_error(
    client: Client, settings: Settings, store: FakeLifecycleStore
) -> None:
    sid = store.add_stream()
    handle = await send(
        client,
        settings,
        init_startup(sid),
        event(sid, Service.ML, EventKind.ERROR, error="model failed to load"),
    )

    result = await handle.result()

    assert (result.state, result.error_reason) == (S.INACTIVE_ERROR, "ml error: model failed to load")
    assert S.RUNNER_STARTED not in store.streams[sid].states


async def test_ml_never_started_does_not_hold_up_shutdown(
    client: Client, settings: Settings, store: FakeLifecycleStore
) -> None:
    sid = store.add_stream()
    handle = await send(
        client, settings, init_startup(sid), event(sid, Service.RUNNER, state=S.RUNNER_STARTED)
    )
    await wait_for_state(handle, S.RUNNER_STARTED)
    await send(client, settings, init_shutdown(sid))

    result = await handle.result()  # ML acknowledges a stop of a stream it never ran

    assert (result.state, result.error_reason) == (S.INACTIVE, None)
    assert S.ML_STARTED not in store.streams[sid].states
    await record_history(client, handle, "ml_never_started")


async def test_ml_never_started_and_silent_is_bounded_by_the_ack_deadline(
    client: Client, time_skipping: WorkflowEnvironment, settings: Settings, store: FakeLifecycleStore
) -> None:
    store.answers = {Service.RUNNER: 1}
    sid = store.add_stream()
    handle = await send(
        client, settings, init_startup(sid), event(sid, Service.RUNNER, state=S.RUNNER_STARTED)
    )
    await wait_for_state(handle, S.RUNNER_STARTED)
    await send(client, settings, init_shutdown(sid))

    result = await handle.result()

    stream = store.streams[sid]
    shutdown_took = stream.changed_at[-1] - stream.changed_at[stream.states.index(S.INIT_SHUTDOWN)]
    assert result.state is S.INACTIVE_ERROR
    assert result.error_reason is not None and "from ml" in result.error_reason
    assert shutdown_took.total_seconds() < 2 * settings.ack_deadline_s + 5


async def test_cancel_runs_the_shutdown_path_and_stores_a_terminal_state(
    client: Client, settings: Settings, store: FakeLifecycleStore
) -> None:
    sid = store.add_stream()
    handle = await send(
        client,
        settings,
        init_startup(sid),
        event(sid, Service.RUNNER, state=S.RUNNER_STARTED),
        event(sid, Service.ML, state=S.ML_STARTED),
    )
    await wait_for_state(handle, S.ML_STARTED)

    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()

    assert isinstance(failure.value.cause, CancelledError)
    stream = store.streams[sid]
    assert stream.states[-3:] == [S.INIT_SHUTDOWN, S.IN_SHUTDOWN_PROCESSING, S.INACTIVE]
    assert stream.changes[-3].reason == "workflow cancelled"
    assert len(store.stops(sid)) == 1
    await record_history(client, handle, "cancelled")


async def test_cancel_while_waiting_for_acks_still_finishes_the_shutdown(
    client: Client, settings: Settings, store: FakeLifecycleStore
) -> None:
    store.answers = {Service.RUNNER: 1}
    sid = store.add_stream()
    handle = await send(client, settings, init_startup(sid), event(sid, Service.ML, state=S.ML_STARTED))
    await wait_for_state(handle, S.ML_STARTED)
    await send(client, settings, init_shutdown(sid))
    await wait_for(handle, lambda s: s.acknowledged == [Service.RUNNER], "the runner's acknowledgement")

    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()

    assert isinstance(failure.value.cause, CancelledError)
    stream = store.streams[sid]
    assert stream.state is S.INACTIVE_ERROR
    assert stream.error_reason is not None and "from ml" in stream.error_reason
    assert len(store.stops(sid)) == 2


async def test_duplicated_and_reordered_events_never_move_the_state_backwards(
    client: Client, settings: Settings, store: FakeLifecycleStore
) -> None:
    sid = store.add_stream()
    ml_started = event(sid, Service.ML, state=S.ML_STARTED)
    runner_error = event(sid, Service.RUNNER, EventKind.ERROR, error="late duplicate must not count twice")
    handle = await send(client, settings, init_startup(sid), ml_started, ml_started, ml_started)
    await wait_for_state(handle, S.ML_STARTED)
    # the runner's progress arrives after ML's, and both acks before the shutdown event itself
    await send(
        client,
        settings,
        event(sid, Service.RUNNER, state=S.RUNNER_STARTED),
        init_startup(sid),
        event(sid, Service.RUNNER, EventKind.ACK),
        event(sid, Service.ML, EventKind.ACK),
    )
    status = await wait_for(handle, lambda s: len(s.acknowledged) == 2, "both acknowledgements")
    assert status.state is S.ML_STARTED
    assert status.events_received == 6, "the repeated ml_started event counted once"

    await send(client, settings, init_shutdown(sid))
    result = await handle.result()

    assert (result.state, result.error_reason) == (S.INACTIVE, None)
    assert store.streams[sid].states == [
        S.IN_STARTUP_PROCESSING,
        S.ML_STARTED,
        S.INIT_SHUTDOWN,
        S.IN_SHUTDOWN_PROCESSING,
        S.INACTIVE,
    ]
    assert store.stops(sid) == [], "both acknowledgements came before the shutdown event"
    # a duplicate arriving after the end starts no second run: the stream's lifecycle ran once
    with pytest.raises(WorkflowAlreadyStartedError):
        await send(client, settings, runner_error)
    assert store.streams[sid].states[-1] is S.INACTIVE


async def test_shutdown_stored_before_the_workflow_started_goes_straight_to_stopping(
    client: Client, settings: Settings, store: FakeLifecycleStore
) -> None:
    sid = store.add_stream(state=S.INIT_SHUTDOWN)

    result = await (await send(client, settings, init_startup(sid), init_shutdown(sid))).result()

    assert (result.state, result.error_reason) == (S.INACTIVE, None)
    assert store.streams[sid].states == [S.IN_SHUTDOWN_PROCESSING, S.INACTIVE]


async def test_restarted_lifecycle_of_a_running_stream_has_no_startup_deadline(
    client: Client, time_skipping: WorkflowEnvironment, settings: Settings, store: FakeLifecycleStore
) -> None:
    sid = store.add_stream(state=S.ML_STARTED)  # e.g. after an emergency terminate of its workflow
    handle = await send(client, settings, event(sid, Service.RUNNER, EventKind.ACK))
    await wait_for_state(handle, S.ML_STARTED)

    await time_skipping.sleep(2 * settings.startup_deadline_s)

    assert (await handle.query(StreamLifecycle.current_state)).state is S.ML_STARTED
    assert store.commands == []
    await send(client, settings, init_shutdown(sid))
    result = await handle.result()
    assert (result.state, result.error_reason) == (S.INACTIVE, None)


async def test_event_for_an_unknown_stream_ends_the_workflow_at_once(
    client: Client, settings: Settings, store: FakeLifecycleStore
) -> None:
    sid = str(uuid.uuid4())

    result = await (await send(client, settings, init_startup(sid))).result()

    assert result.state is None
    assert store.commands == []


async def test_continue_as_new_carries_state_acks_and_dedupe_ids(
    client: Client, settings: Settings, store: FakeLifecycleStore
) -> None:
    store.answers = {Service.ML: 1}  # the runner acknowledged before, in the first run
    sid = store.add_stream()
    first = await client.start_workflow(
        StreamLifecycle.run,
        lifecycle_params(settings, sid).model_copy(update={"max_history_events": 50}),
        id=workflow_id(sid),
        task_queue=settings.temporal_task_queue,
        start_signal="state_event",
        start_signal_args=[init_startup(sid)],
    )
    first_run = first.result_run_id
    runner_ack = event(sid, Service.RUNNER, EventKind.ACK)
    await send(client, settings, event(sid, Service.ML, state=S.ML_STARTED), runner_ack)
    for _ in range(20):  # harmless late progress events, each one more history event
        await first.signal(StreamLifecycle.state_event, event(sid, Service.RUNNER, state=S.RUNNER_STARTED))
    latest: Handle = client.get_workflow_handle_for(StreamLifecycle.run, workflow_id(sid))
    for _ in range(100):  # a signal arriving meanwhile makes Temporal retry the continue-as-new task
        described = await latest.describe()
        if described.run_id != first_run:
            break
        await asyncio.sleep(0.05)
    assert described.run_id != first_run, "the run never continued as new"
    assert described.typed_search_attributes.get(STREAM_ID) == sid
    assert await described.memo_value(MEMO_URL) == "rtsp://***@cam.local:8554/live"

    status = await wait_for_state(latest, S.ML_STARTED)
    assert status.acknowledged == [Service.RUNNER]
    await latest.signal(StreamLifecycle.state_event, runner_ack)  # seen in the first run: dropped
    assert (await latest.query(StreamLifecycle.current_state)).events_received == status.events_received

    await latest.signal(StreamLifecycle.state_event, init_shutdown(sid))
    result = await latest.result()

    assert (result.state, result.error_reason) == (S.INACTIVE, None)
    assert len(store.stops(sid)) == 1
    assert store.streams[sid].states.count(S.IN_STARTUP_PROCESSING) == 1
    started = (
        await client.get_workflow_handle(workflow_id(sid), run_id=described.run_id).fetch_history()
    ).events[0]
    payloads = started.workflow_execution_started_event_attributes.input.payloads
    [params] = await client.data_converter.decode(payloads, [LifecycleParams])
    assert params.carry is not None and runner_ack.event_id in params.carry.seen_event_ids
    await record_history(client, first, "continue_as_new", run_id=first_run)
