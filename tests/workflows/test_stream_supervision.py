"""The lifecycle as its stream's supervisor, on the time-skipping server with in-memory activities:
heartbeats kept as health, restarts of silent or crashed services, the restart budget, camera
outages retried for a window, and shutdowns that end a stream cleanly in the middle of all that."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from core.health import HealthStatus, StreamHealth
from core.health_events import HealthKind
from core.messages import CameraState, ErrorKind, EventKind, Service, StateEvent, StreamFigures
from core.settings import Settings
from core.states import StreamState
from core.temporal import workflow_id
from tests.conftest import make_settings
from tests.workflows.driving import (
    Handle,
    event,
    init_shutdown,
    init_startup,
    record_history,
    send,
    wait_for_state,
)
from tests.workflows.fakes import FakeLifecycleStore
from workflows.starter import lifecycle_params
from workflows.stream_lifecycle import StreamLifecycle

S = StreamState
LIVENESS_S = 20.0


@pytest.fixture
def settings() -> Settings:
    """Watchdog settings on a task queue of this test (shadows the session ``settings``)."""
    return make_settings(
        temporal_task_queue=f"supervision-{uuid.uuid4().hex[:8]}",
        startup_deadline_s=60.0,
        ack_deadline_s=15.0,
        liveness_timeout_s=LIVENESS_S,
        restart_budget=3,
        restart_window_s=3600.0,
        camera_retry_s=120.0,
        # health events (tests of their own): none falls due among the timers these tests skip through
        health_debounce_s=LIVENESS_S * 20,
    )


@pytest.fixture
def client(time_skipping: WorkflowEnvironment) -> Client:
    return time_skipping.client


@pytest.fixture
async def store(client: Client, settings: Settings) -> AsyncIterator[FakeLifecycleStore]:
    fake = FakeLifecycleStore(client)
    async with Worker(
        client,
        task_queue=settings.temporal_task_queue,
        workflows=[StreamLifecycle],
        activities=fake.activities,
    ):
        yield fake


async def running_stream(client: Client, settings: Settings, store: FakeLifecycleStore) -> tuple[str, Handle]:
    sid = store.add_stream()
    handle = await send(
        client,
        settings,
        init_startup(sid),
        event(sid, Service.RUNNER, state=S.RUNNER_STARTED),
        event(sid, Service.ML, state=S.ML_STARTED),
    )
    await wait_for_state(handle, S.ML_STARTED)
    return sid, handle


def heartbeat(sid: str, service: Service, **figures: object):  # type: ignore[no-untyped-def]
    return event(sid, service, EventKind.HEARTBEAT, figures=StreamFigures.model_validate(figures))


async def beat_both(
    client: Client, settings: Settings, sid: str, *, camera: CameraState = CameraState.STREAMING
) -> None:
    await send(
        client,
        settings,
        heartbeat(sid, Service.RUNNER, frames_published=10, camera=camera),
        heartbeat(sid, Service.ML, frames_processed=10),
    )


async def eventually(check, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout_s / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met")


async def test_heartbeats_keep_a_running_stream_healthy_and_send_no_restart(
    client: Client, time_skipping: WorkflowEnvironment, settings: Settings, store: FakeLifecycleStore
) -> None:
    sid, handle = await running_stream(client, settings, store)
    for _ in range(6):  # two minutes of heartbeats every 10 s
        await beat_both(client, settings, sid)
        await time_skipping.sleep(LIVENESS_S / 2)

    health = await handle.query(StreamLifecycle.health)
    assert {s: h.status for s, h in health.services.items()} == {
        Service.RUNNER: HealthStatus.OK,
        Service.ML: HealthStatus.OK,
    }
    assert health.services[Service.ML].figures is not None
    assert health.services[Service.ML].figures.frames_processed == 10
    assert store.restarts_of(sid) == []
    assert (await handle.query(StreamLifecycle.current_state)).state is S.ML_STARTED
    await send(client, settings, init_shutdown(sid))
    assert (await handle.result()).state is S.INACTIVE
    await record_history(client, handle, "heartbeats_healthy")


async def test_a_silent_service_is_restarted_with_growing_waits_then_the_stream_ends_naming_it(
    client: Client, time_skipping: WorkflowEnvironment, settings: Settings, store: FakeLifecycleStore
) -> None:
    sid, handle = await running_stream(client, settings, store)
    # the runner keeps beating; ML never does
    for _ in range(40):
        await send(client, settings, heartbeat(sid, Service.RUNNER, frames_published=5))
        await time_skipping.sleep(LIVENESS_S / 2)
        if (await handle.describe()).status is not None and store.streams[sid].state.is_terminal:
            break

    result = await handle.result()
    assert result.state is S.INACTIVE_ERROR
    assert result.error_reason is not None
    assert result.error_reason.startswith("ml lost the stream: no heartbeat for"), result.error_reason
    assert "3 restarts in the last 60 min did not bring it back" in result.error_reason
    restarts = store.restarts_of(sid)
    assert [service for service, _ in restarts] == [Service.ML] * 3, "the runner was alive throughout"
    assert all(reason.startswith("no heartbeat for") for _, reason in restarts)
    await record_history(client, handle, "silent_service_restarts_then_gives_up")


async def test_a_restarted_service_that_beats_again_keeps_the_stream_running(
    client: Client, time_skipping: WorkflowEnvironment, settings: Settings, store: FakeLifecycleStore
) -> None:
    sid, handle = await running_stream(client, settings, store)
    await beat_both(client, settings, sid)
    await time_skipping.sleep(LIVENESS_S * 1.5)  # both silent: both restarted
    await eventually(lambda: _restarted(store, sid, 2))
    health = await handle.query(StreamLifecycle.health)
    assert health.services[Service.ML].status is HealthStatus.RECOVERING
    assert health.services[Service.ML].last_restart_reason is not None

    await beat_both(client, settings, sid)
    await time_skipping.sleep(LIVENESS_S / 2)
    health = await handle.query(StreamLifecycle.health)
    assert health.services[Service.ML].status is HealthStatus.OK
    assert health.services[Service.ML].restarts == 1
    assert (await handle.query(StreamLifecycle.current_state)).state is S.ML_STARTED
    await send(client, settings, init_shutdown(sid))
    assert (await handle.result()).state is S.INACTIVE


def camera_gone(sid: str, error: str = "camera frozen; gave up") -> StateEvent:
    """The runner's error once its reconnect budget is spent (a new event each time)."""
    return event(sid, Service.RUNNER, EventKind.ERROR, error=error, error_kind=ErrorKind.CAMERA)


async def health_when(handle: Handle, predicate: Callable[[StreamHealth], bool]) -> StreamHealth:
    """The health once ``predicate`` holds (a signal is taken before the workflow has applied it)."""
    for _ in range(200):
        health = await handle.query(StreamLifecycle.health)
        if predicate(health):
            return health
        await asyncio.sleep(0.05)
    raise AssertionError(f"health never as expected: {health}")


async def _continued(handle: Handle, first_run: str | None) -> bool:
    return (await handle.describe()).run_id != first_run


async def _restarted(store: FakeLifecycleStore, sid: str, count: int) -> bool:
    return len(store.restarts_of(sid)) >= count


async def test_a_process_error_restarts_that_service_at_once_and_the_stream_stays_running(
    client: Client, settings: Settings, store: FakeLifecycleStore
) -> None:
    sid, handle = await running_stream(client, settings, store)
    crash = event(
        sid,
        Service.RUNNER,
        EventKind.ERROR,
        error="capture process died (exit code -9)",
        error_kind=ErrorKind.PROCESS,
    )
    await send(client, settings, crash)

    await eventually(lambda: _restarted(store, sid, 1))
    assert store.restarts_of(sid) == [(Service.RUNNER, "runner error: capture process died (exit code -9)")]
    assert (await handle.query(StreamLifecycle.current_state)).state is S.ML_STARTED
    await send(client, settings, init_shutdown(sid))
    assert (await handle.result()).state is S.INACTIVE
    await record_history(client, handle, "process_error_restarts")


async def test_an_unreachable_camera_is_retried_and_a_camera_back_within_the_window_runs_on(
    client: Client, time_skipping: WorkflowEnvironment, settings: Settings, store: FakeLifecycleStore
) -> None:
    sid, handle = await running_stream(client, settings, store)
    await send(client, settings, camera_gone(sid))
    health = await health_when(handle, lambda h: h.camera_unreachable_since is not None)
    assert health.services[Service.RUNNER].status is HealthStatus.CAMERA_UNREACHABLE

    await send(client, settings, heartbeat(sid, Service.ML, frames_processed=10))  # ML lives on
    await time_skipping.sleep(LIVENESS_S / 2)
    await eventually(lambda: _restarted(store, sid, 1))
    assert store.restarts_of(sid)[0] == (Service.RUNNER, "camera unreachable: retry 1")
    await send(client, settings, heartbeat(sid, Service.RUNNER, camera=CameraState.RECONNECTING))
    await send(client, settings, camera_gone(sid))  # still down after the runner's reconnect budget
    await send(client, settings, heartbeat(sid, Service.ML, frames_processed=10))
    await time_skipping.sleep(LIVENESS_S * 3 / 4)
    await eventually(lambda: _restarted(store, sid, 2))
    assert store.restarts_of(sid)[1] == (Service.RUNNER, "camera unreachable: retry 2")
    await beat_both(client, settings, sid)  # the camera is back

    health = await health_when(handle, lambda h: h.camera_unreachable_since is None)
    assert health.services[Service.RUNNER].status is HealthStatus.OK
    await time_skipping.sleep(3 * LIVENESS_S / 4)
    assert (await handle.query(StreamLifecycle.current_state)).state is S.ML_STARTED
    await send(client, settings, init_shutdown(sid))
    assert (await handle.result()).state is S.INACTIVE


async def test_a_camera_gone_for_good_ends_the_stream_after_the_retry_window_naming_the_camera(
    client: Client, time_skipping: WorkflowEnvironment, settings: Settings, store: FakeLifecycleStore
) -> None:
    sid, handle = await running_stream(client, settings, store)
    started = await time_skipping.get_current_time()
    for _ in range(30):  # the runner gives up on the camera again after each restart
        retried = len(store.restarts_of(sid))
        await send(client, settings, camera_gone(sid, "could not open the stream"))
        for _ in range(20):
            await send(client, settings, heartbeat(sid, Service.ML, frames_processed=0))
            await time_skipping.sleep(LIVENESS_S / 4)
            if len(store.restarts_of(sid)) > retried or store.streams[sid].state.is_terminal:
                break
        if store.streams[sid].state.is_terminal:
            break

    result = await handle.result()
    assert result.state is S.INACTIVE_ERROR
    assert result.error_reason is not None
    assert result.error_reason.startswith("camera unreachable for"), result.error_reason
    assert "could not open the stream" in result.error_reason
    # the first shutdown state is stored at the end of the window
    gave_up = store.streams[sid].changed_at[-3]
    assert timedelta(seconds=120) <= gave_up - started <= timedelta(seconds=120 + LIVENESS_S / 4)
    assert all(service is Service.RUNNER for service, _ in store.restarts_of(sid))
    assert len(store.restarts_of(sid)) >= 2
    await record_history(client, handle, "camera_gone_for_good")


@pytest.mark.parametrize("during", ["restart", "camera_outage"])
async def test_a_shutdown_during_a_restart_or_a_camera_outage_ends_the_stream_inactive(
    during: str,
    client: Client,
    time_skipping: WorkflowEnvironment,
    settings: Settings,
    store: FakeLifecycleStore,
) -> None:
    sid, handle = await running_stream(client, settings, store)
    if during == "restart":
        await time_skipping.sleep(LIVENESS_S * 1.2)  # both silent: restarts sent, no answer yet
        await eventually(lambda: _restarted(store, sid, 2))
    else:
        await send(
            client,
            settings,
            event(sid, Service.RUNNER, EventKind.ERROR, error="no camera", error_kind=ErrorKind.CAMERA),
        )
    requested = await time_skipping.get_current_time()

    await send(client, settings, init_shutdown(sid))
    result = await handle.result()

    assert (result.state, result.error_reason) == (S.INACTIVE, None)
    ended = store.streams[sid].changed_at[-1]
    assert ended - requested <= timedelta(seconds=settings.ack_deadline_s)
    assert len(store.stops(sid)) == 1


async def test_continue_as_new_carries_the_health_and_the_restart_count(
    client: Client, time_skipping: WorkflowEnvironment, settings: Settings, store: FakeLifecycleStore
) -> None:
    sid = store.add_stream()
    first = await client.start_workflow(
        StreamLifecycle.run,
        lifecycle_params(settings, sid).model_copy(update={"max_history_events": 80}),
        id=workflow_id(sid),
        task_queue=settings.temporal_task_queue,
        start_signal="state_event",
        start_signal_args=[init_startup(sid)],
    )
    await send(client, settings, event(sid, Service.RUNNER, state=S.RUNNER_STARTED))
    await send(client, settings, event(sid, Service.ML, state=S.ML_STARTED))
    await wait_for_state(first, S.ML_STARTED)
    await time_skipping.sleep(LIVENESS_S * 1.2)  # both silent: one restart each
    await eventually(lambda: _restarted(store, sid, 2))
    latest = client.get_workflow_handle_for(StreamLifecycle.run, workflow_id(sid))
    for _ in range(20):  # heartbeats: the history grows past its limit
        await beat_both(client, settings, sid)
    # a signal arriving meanwhile makes Temporal retry the continue-as-new task: let it through
    await eventually(lambda: _continued(latest, first.result_run_id))

    health = await latest.query(StreamLifecycle.health)
    assert health.services[Service.ML].restarts == 1
    assert health.services[Service.RUNNER].restarts == 1
    assert health.supervised_since is not None
    assert health.services[Service.ML].status is HealthStatus.OK
    await send(client, settings, init_shutdown(sid))
    assert (await latest.result()).state is S.INACTIVE


# --- health events (the watchdog's rules: test_health_event_rules.py) ----------------------------------

HEALTH_DEBOUNCE_S = 3.0


async def test_a_camera_outage_a_restart_and_the_end_are_told_once_each(
    client: Client, time_skipping: WorkflowEnvironment, settings: Settings, store: FakeLifecycleStore
) -> None:
    settings = settings.model_copy(update={"health_debounce_s": HEALTH_DEBOUNCE_S})
    sid, handle = await running_stream(client, settings, store)
    await beat_both(client, settings, sid)
    await send(client, settings, camera_gone(sid))
    await send(client, settings, heartbeat(sid, Service.ML, frames_processed=10))
    await time_skipping.sleep(LIVENESS_S / 2)

    async def told(count: int) -> bool:
        return len(store.health_of(sid)) >= count

    await eventually(lambda: told(1))
    await beat_both(client, settings, sid)  # the camera is back
    await eventually(lambda: told(2))
    crash = event(
        sid, Service.ML, EventKind.ERROR, error="detection process died", error_kind=ErrorKind.PROCESS
    )
    await send(client, settings, crash)
    await eventually(lambda: told(3))
    await send(client, settings, heartbeat(sid, Service.ML, frames_processed=1))
    await send(client, settings, init_shutdown(sid))
    assert (await handle.result()).state is S.INACTIVE

    offline, online, restarted = store.health_of(sid)
    assert [offline.kind, online.kind, restarted.kind] == [
        HealthKind.CAMERA_OFFLINE, HealthKind.CAMERA_ONLINE, HealthKind.SERVICE_RESTARTED,
    ]  # fmt: skip
    assert offline.since is not None and online.since == offline.since
    assert online.downtime_s is not None and online.downtime_s >= HEALTH_DEBOUNCE_S
    assert offline.reason is not None and "gave up" in offline.reason
    assert restarted.service is Service.ML and restarted.reason is not None and "died" in restarted.reason
    assert len({e.event_id for e in store.health_events}) == len(store.health_events)


async def test_a_stream_that_ends_in_error_is_told_failed_for_good(
    client: Client, settings: Settings, store: FakeLifecycleStore
) -> None:
    sid, handle = await running_stream(client, settings, store)
    fatal = event(sid, Service.ML, EventKind.ERROR, error="model does not load", error_kind=ErrorKind.FATAL)
    await send(client, settings, fatal)
    assert (await handle.result()).state is S.INACTIVE_ERROR
    [failed] = store.health_of(sid)
    assert failed.kind is HealthKind.STREAM_FAILED and failed.final is True
    assert failed.reason is not None and "model does not load" in failed.reason
