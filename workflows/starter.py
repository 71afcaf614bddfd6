"""How the state-manager bridge hands a state event to a stream's lifecycle workflow."""

from __future__ import annotations

from temporalio.client import Client, WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDReusePolicy

from core.messages import StateEvent
from core.settings import Settings
from core.states import StreamState
from core.temporal import STREAM_ID, STREAM_STATE, workflow_id
from workflows.models import LifecycleParams, LifecycleStatus
from workflows.stream_lifecycle import StreamLifecycle


def lifecycle_params(settings: Settings, stream_id: str) -> LifecycleParams:
    """The workflow input for a stream, with the deadlines of ``settings``."""
    return LifecycleParams(
        stream_id=stream_id,
        startup_deadline_s=settings.startup_deadline_s,
        ack_deadline_s=settings.ack_deadline_s,
        liveness_timeout_s=settings.liveness_timeout_s,
        restart_budget=settings.restart_budget,
        restart_window_s=settings.restart_window_s,
        restart_backoff_max_s=settings.restart_backoff_max_s,
        camera_retry_s=settings.camera_retry_s,
        health_debounce_s=settings.health_debounce_s,
    )


async def signal_with_start(
    client: Client, settings: Settings, event: StateEvent
) -> WorkflowHandle[StreamLifecycle, LifecycleStatus]:
    """Signal ``event`` to its stream's workflow, starting the workflow when none is running.

    Returns once Temporal has accepted the signal, so the caller may then commit the event's offset.
    A stream's workflow runs once: when it has ended, a late event (an acknowledgement of a re-sent
    stop, a repeated shutdown) raises ``WorkflowAlreadyStartedError`` instead of starting another
    run. ``client`` must use ``core.temporal.DATA_CONVERTER`` (``connect_temporal`` does).
    """
    return await client.start_workflow(
        StreamLifecycle.run,
        lifecycle_params(settings, event.stream_id),
        id=workflow_id(event.stream_id),
        task_queue=settings.temporal_task_queue,
        start_signal="state_event",
        start_signal_args=[event],
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(STREAM_ID, event.stream_id),
                SearchAttributePair(STREAM_STATE, StreamState.INIT_STARTUP.value),
            ]
        ),
    )
