"""Driving a StreamLifecycle in tests: events as the services send them, waits on its live state,
and recording its history for the replay test (``LOOKOUT_RECORD_HISTORIES=1``)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from temporalio.client import Client, WorkflowHandle

from core.messages import ErrorKind, EventKind, Service, StateEvent, StreamFigures
from core.settings import Settings
from core.states import StreamState
from workflows.models import LifecycleStatus
from workflows.starter import signal_with_start
from workflows.stream_lifecycle import StreamLifecycle

HISTORIES = Path(__file__).parent / "histories"
S = StreamState
Handle = WorkflowHandle[StreamLifecycle, LifecycleStatus]


def event(
    stream_id: str,
    service: Service,
    kind: EventKind = EventKind.PROGRESS,
    state: StreamState | None = None,
    error: str | None = None,
    event_id: str | None = None,
    error_kind: ErrorKind | None = None,
    figures: StreamFigures | None = None,
) -> StateEvent:
    return StateEvent(
        event_id=event_id or str(uuid.uuid4()),
        stream_id=stream_id,
        service=service,
        kind=kind,
        state=state,
        error=error,
        error_kind=error_kind,
        figures=figures,
    )


def init_startup(stream_id: str) -> StateEvent:
    return event(stream_id, Service.API, state=S.INIT_STARTUP)


def init_shutdown(stream_id: str) -> StateEvent:
    return event(stream_id, Service.API, state=S.INIT_SHUTDOWN)


async def send(client: Client, settings: Settings, *events: StateEvent) -> Handle:
    """What the bridge does with each event: signal-with-start, one at a time."""
    handle = None
    for item in events:
        handle = await signal_with_start(client, settings, item)
    assert handle is not None
    return handle


async def wait_for(
    handle: Handle, predicate: Callable[[LifecycleStatus], bool], what: str
) -> LifecycleStatus:
    """Ask the live state until ``predicate(status)`` holds (queries may run before a signal lands)."""
    for _ in range(200):
        status = await handle.query(StreamLifecycle.current_state)
        if predicate(status):
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"workflow never reached {what}: {status}")


async def wait_for_state(handle: Handle, state: StreamState) -> LifecycleStatus:
    return await wait_for(handle, lambda s: s.state is state, state.value)


async def record_history(client: Client, handle: Handle, name: str, run_id: str | None = None) -> None:
    if os.environ.get("LOOKOUT_RECORD_HISTORIES") != "1":
        return
    history = await client.get_workflow_handle(handle.id, run_id=run_id).fetch_history()
    HISTORIES.mkdir(exist_ok=True)
    (HISTORIES / f"{name}.json").write_text(history.to_json())
