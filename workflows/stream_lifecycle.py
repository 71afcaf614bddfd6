"""StreamLifecycle: the durable state machine of one stream (DESIGN.md "Lifecycle states").

One workflow per stream, id ``stream-<stream id>``. The state-manager bridge starts it and feeds it
every state event of the stream through signal-with-start of ``state_event``; the workflow dedupes
them by event id, records each state change in Postgres through an activity, sends stop commands
through the outbox, and waits for every service's acknowledgement with timers. While the stream
runs it is also its supervisor (``workflows/supervision.py``): it keeps the services' heartbeats as
the stream's health (the ``health`` query), restarts a service that falls silent or whose process
dies, retries an unreachable camera, and ends the stream only past those budgets.

Operators: ``temporal workflow cancel -w stream-<id>`` runs the normal shutdown path (stop commands,
acknowledgements, a terminal state in Postgres) and ends the workflow as cancelled.
``temporal workflow terminate`` is the emergency exit only: it ends the workflow at once, sends no
stop command and leaves the stored state where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NoReturn

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributePair, TypedSearchAttributes

with workflow.unsafe.imports_passed_through():
    from activities.lifecycle import LifecycleActivities
    from activities.models import RestartRequest, StateChange
    from core.health import HEALTH_QUERY, StreamHealth
    from core.health_events import HealthEvent
    from core.messages import EventKind, Service, StateEvent, StopCommand
    from core.states import StreamState, may_advance
    from core.temporal import STREAM_ID, STREAM_STATE
    from workflows.models import LifecycleCarry, LifecycleParams, LifecycleStatus
    from workflows.supervision import GiveUp, Restart, StreamSupervisor

# The services that run a stream; each must acknowledge a stop.
STOPPED_SERVICES = (Service.RUNNER, Service.ML)
MEMO_URL = "url_redacted"
# Event ids remembered for dedupe; a stream sees a handful of events, so this bounds memory only.
MAX_SEEN_EVENT_IDS = 1000
# Marks the runs that supervise their stream; runs recorded before it replay without (see run()).
SELF_HEALING_PATCH = "self-healing"
RUNNER_WATCHED_AT_START_PATCH = "runner-watched-at-start"
HEALTH_EVENTS_PATCH = "health-events"
ACTIVITY_TIMEOUT = timedelta(seconds=30)
MIN_TIMER_S = 0.5
# No maximum attempts: while Postgres is down the lifecycle waits, durably, rather than give up.
ACTIVITY_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))


@dataclass(frozen=True)
class _ShutdownRequest:
    reason: str  # why the stream stops, kept in the audit rows
    error: str | None = None  # set when it stops because something went wrong: ends in inactive_error
    event_id: str | None = None


@workflow.defn
class StreamLifecycle:
    """The lifecycle of one stream: startup deadline, shutdown with acknowledgements, compensation."""

    @workflow.init
    def __init__(self, params: LifecycleParams) -> None:
        carry = params.carry
        self._params = params
        self._state: StreamState | None = carry.state if carry else None
        self._url_redacted = carry.url_redacted if carry else None
        self._error_reason: str | None = None
        self._startup_deadline_at = carry.startup_deadline_at if carry else None
        self._acknowledged: set[Service] = set(carry.acknowledged) if carry else set()
        self._failed: dict[Service, str] = dict(carry.failed) if carry else {}
        self._seen: dict[str, None] = dict.fromkeys(carry.seen_event_ids) if carry else {}
        self._inbox: deque[StateEvent] = deque(carry.pending_events) if carry else deque()
        self._events_received = carry.events_received if carry else 0
        health = carry.health if carry and carry.health else StreamHealth()
        self._supervisor: StreamSupervisor = StreamSupervisor(params, health)
        self._self_healing = False
        self._health_events = False

    @workflow.run
    async def run(self, params: LifecycleParams) -> LifecycleStatus:
        # Runs started by this code supervise their stream; a history recorded before supervision
        # existed has no marker and replays as it ran (no heartbeats, an error ends the stream).
        self._self_healing = workflow.patched(SELF_HEALING_PATCH)
        self._health_events = self._self_healing and workflow.patched(HEALTH_EVENTS_PATCH)
        self._supervisor.telling = self._health_events
        cancelled: asyncio.CancelledError | None = None
        try:
            if params.carry is None and not await self._begin():
                return self.current_state()
            request = await self._until_shutdown_requested()
        except asyncio.CancelledError as err:
            cancelled = err
            request = _ShutdownRequest(reason="workflow cancelled")
        # A cancel that arrives while stopping asks for what is already under way: the shield keeps
        # the shutdown, and its wait for acknowledgements, going to a terminal state.
        shutdown = asyncio.create_task(self._shut_down(request))
        while not shutdown.done():
            try:
                await asyncio.shield(shutdown)
            except asyncio.CancelledError as err:
                cancelled = err
        shutdown.result()
        if cancelled is not None:
            raise cancelled  # ends the workflow as cancelled, after the terminal state is stored
        return self.current_state()

    @workflow.signal(name="state_event")
    def state_event(self, event: StateEvent) -> None:
        """Take one state event of the stream; a repeated event id is dropped."""
        if event.event_id in self._seen:
            return
        if event.stream_id != self._params.stream_id:
            workflow.logger.warning(
                "event of another stream dropped",
                extra={"stream_id": self._params.stream_id, "event_stream_id": event.stream_id},
            )
            return
        self._seen[event.event_id] = None
        if len(self._seen) > MAX_SEEN_EVENT_IDS:
            del self._seen[next(iter(self._seen))]
        self._events_received += 1
        self._inbox.append(event)

    @workflow.query(name=HEALTH_QUERY)
    def health(self) -> StreamHealth:
        """The services' latest figures and status for the stream, and what the watchdog did."""
        return self._supervisor.health

    @workflow.query(name="current_state")
    def current_state(self) -> LifecycleStatus:
        """The live state, its error reason and who has acknowledged a stop."""
        return LifecycleStatus(
            stream_id=self._params.stream_id,
            state=self._state,
            error_reason=self._error_reason,
            acknowledged=sorted(self._acknowledged),
            events_received=self._events_received,
        )

    # -- phases ---------------------------------------------------------------------------------

    async def _begin(self) -> bool:
        """Load the stream and show it in the Web UI; False when there is nothing to run."""
        stream = await workflow.execute_activity_method(
            LifecycleActivities.load_stream,
            self._params.stream_id,
            start_to_close_timeout=ACTIVITY_TIMEOUT,
            retry_policy=ACTIVITY_RETRY,
        )
        if stream is None:
            workflow.logger.warning("no such stream", extra={"stream_id": self._params.stream_id})
            return False
        self._state = stream.state
        self._error_reason = stream.error_reason
        self._url_redacted = stream.url_redacted
        workflow.upsert_memo({MEMO_URL: stream.url_redacted})
        workflow.upsert_search_attributes(
            [STREAM_ID.value_set(self._params.stream_id), STREAM_STATE.value_set(stream.state.value)]
        )
        if stream.state.is_terminal:  # a late event started a new run for a finished stream
            return False
        if stream.state.rank < StreamState.ML_STARTED.rank:
            self._startup_deadline_at = workflow.now() + timedelta(seconds=self._params.startup_deadline_s)
            if self._self_healing and workflow.patched(RUNNER_WATCHED_AT_START_PATCH):
                self._supervisor.watch_runner_from(workflow.now())
        await self._advance(StreamState.IN_STARTUP_PROCESSING)
        return True

    async def _until_shutdown_requested(self) -> _ShutdownRequest:
        """Follow startup and running until a shutdown request, an error or the startup deadline."""
        if self._state is not None and self._state.is_shutting_down:
            return _ShutdownRequest(reason=f"stored state is {self._state.value}")
        while True:
            while self._inbox:
                request = await self._apply_while_running(self._inbox.popleft())
                await self._tell_health()
                if request is not None:
                    return request
            request = await self._supervise()
            await self._tell_health()
            if request is not None:
                return request
            if self._history_is_long():
                await self._continue_as_new()
            timeout = self._seconds_to_startup_deadline()
            check_at = self._supervisor.next_check_at() if self._self_healing else None
            if check_at is not None:
                floor = MIN_TIMER_S if self._health_events else 0.0  # runs before it replay as they ran
                # never a timer of a few ms: one that fires as a signal cancels it trips Temporal's
                # test server ("invalid history builder state"), and a check that late is harmless
                to_check = max(floor, (check_at - workflow.now()).total_seconds())
                timeout = to_check if timeout is None else min(timeout, to_check)
            if self._startup_deadline_passed():
                error = (
                    f"startup deadline: not running within {self._params.startup_deadline_s:g}s"
                    f" (last state {self._state.value if self._state else 'unknown'})"
                )
                return _ShutdownRequest(reason="startup deadline", error=error)
            with contextlib.suppress(TimeoutError):  # on timeout the loop finds what is due
                await workflow.wait_condition(lambda: bool(self._inbox), timeout=timeout)

    def _startup_deadline_passed(self) -> bool:
        remaining = self._seconds_to_startup_deadline()
        return remaining is not None and remaining <= 0

    async def _apply_while_running(self, event: StateEvent) -> _ShutdownRequest | None:
        if event.kind is EventKind.HEARTBEAT:
            if self._self_healing:
                self._supervisor.heartbeat(event, workflow.now())
            return None
        if event.kind is EventKind.ERROR and self._self_healing and self._supervisor.supervising:
            decision = self._supervisor.error(event, workflow.now())
            return await self._carry_out(decision, event_id=event.event_id)
        if event.kind is EventKind.ERROR:
            return _ShutdownRequest(
                reason=f"{event.service.value} error",
                error=f"{event.service.value} error: {event.error or 'no details'}",
                event_id=event.event_id,
            )
        if event.kind is EventKind.ACK:  # a stop acknowledged before the shutdown event arrived
            self._note_ack(event)
            return None
        if event.state is StreamState.INIT_SHUTDOWN:
            reason = f"shutdown requested by {event.service.value}"
            return _ShutdownRequest(reason=reason, event_id=event.event_id)
        if event.state in (StreamState.RUNNER_STARTED, StreamState.ML_STARTED):
            if self._self_healing and self._supervisor.supervising:
                self._supervisor.progress(event, workflow.now())
            await self._advance(event.state, event_id=event.event_id, source=event.service.value)
            if self._state is not None and self._state.rank >= StreamState.ML_STARTED.rank:
                self._startup_deadline_at = None
                if self._self_healing:
                    self._supervisor.supervise_from(workflow.now())
        return None

    # -- supervision ----------------------------------------------------------------------------

    async def _supervise(self) -> _ShutdownRequest | None:
        """Carry out what the watchdog finds due: restarts of silent services, camera retries."""
        if not self._self_healing:
            return None
        for decision in self._supervisor.due(workflow.now()):
            request = await self._carry_out(decision)
            if request is not None:
                return request
        return None

    async def _tell_health(self) -> None:
        """Store the health events the watchdog decided (events, outbox, webhooks, MQTT)."""
        for event in self._supervisor.take_announcements():
            if not self._health_events:
                continue
            workflow.logger.info(
                "health event",
                extra={"stream_id": self._params.stream_id, "kind": event.kind.value, "reason": event.reason},
            )
            await self._record_health_event(event)

    async def _record_health_event(self, event: HealthEvent) -> None:
        await workflow.execute_activity_method(
            LifecycleActivities.record_health_event,
            event,
            start_to_close_timeout=ACTIVITY_TIMEOUT,
            retry_policy=ACTIVITY_RETRY,
        )

    async def _carry_out(
        self, decision: Restart | GiveUp | None, event_id: str | None = None
    ) -> _ShutdownRequest | None:
        if isinstance(decision, GiveUp):
            return _ShutdownRequest(reason="supervision gave up", error=decision.reason, event_id=event_id)
        if isinstance(decision, Restart):
            workflow.logger.warning(
                "restarting a service",
                extra={
                    "stream_id": self._params.stream_id,
                    "service": decision.service.value,
                    "reason": decision.reason,
                },
            )
            await workflow.execute_activity_method(
                LifecycleActivities.restart_service,
                RestartRequest(
                    stream_id=self._params.stream_id,
                    service=decision.service,
                    reason=decision.reason,
                    command_id=str(workflow.uuid4()),
                ),
                start_to_close_timeout=ACTIVITY_TIMEOUT,
                retry_policy=ACTIVITY_RETRY,
            )
            self._supervisor.restarted(decision, workflow.now())
        return None

    async def _shut_down(self, request: _ShutdownRequest) -> None:
        """Stop both services, wait for their acknowledgements (one re-send), store the end state."""
        self._startup_deadline_at = None
        await self._advance(StreamState.INIT_SHUTDOWN, reason=request.reason, event_id=request.event_id)
        await self._advance(StreamState.IN_SHUTDOWN_PROCESSING, reason=request.reason)
        ack_deadline = timedelta(seconds=self._params.ack_deadline_s)
        for _attempt in range(2):  # the stop, then one re-send while a service stays silent
            self._apply_while_stopping()
            if not self._unsettled():
                break
            await self._send_stop(request.reason)
            await self._wait_for_acks(until=workflow.now() + ack_deadline)
        self._apply_while_stopping()

        problems = [request.error] if request.error else []
        problems += [f"{name.value} failed to stop: {error}" for name, error in sorted(self._failed.items())]
        silent = self._unsettled()
        if silent:
            names = " and ".join(service.value for service in silent)
            deadline = f"{self._params.ack_deadline_s:g}s"
            problems.append(f"no stop acknowledgement from {names} within {deadline} of a re-sent stop")
        if problems:
            await self._advance(StreamState.INACTIVE_ERROR, reason="; ".join(problems))
            if self._health_events:
                self._supervisor.failed_for_good("; ".join(problems), workflow.now())
                await self._tell_health()
        else:
            await self._advance(StreamState.INACTIVE, reason=request.reason)

    async def _wait_for_acks(self, *, until: datetime) -> None:
        while True:
            self._apply_while_stopping()
            remaining = (until - workflow.now()).total_seconds()
            if not self._unsettled() or remaining <= 0:
                return
            try:
                await workflow.wait_condition(lambda: bool(self._inbox), timeout=remaining)
            except TimeoutError:
                return

    def _apply_while_stopping(self) -> None:
        while self._inbox:
            event = self._inbox.popleft()
            if event.kind is EventKind.ACK:
                self._note_ack(event)
            elif event.kind is EventKind.ERROR and event.service in self._unsettled():
                self._failed[event.service] = event.error or "no details"

    # -- helpers --------------------------------------------------------------------------------

    def _note_ack(self, event: StateEvent) -> None:
        if event.service not in STOPPED_SERVICES:
            return
        if event.error:
            self._failed.setdefault(event.service, event.error)
        else:
            self._acknowledged.add(event.service)

    def _unsettled(self) -> list[Service]:
        """Services that have neither acknowledged a stop nor reported a failure."""
        return [s for s in STOPPED_SERVICES if s not in self._acknowledged and s not in self._failed]

    def _seconds_to_startup_deadline(self) -> float | None:
        if self._startup_deadline_at is None:
            return None
        return (self._startup_deadline_at - workflow.now()).total_seconds()

    def _history_is_long(self) -> bool:
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= self._params.max_history_events
        )

    async def _continue_as_new(self) -> NoReturn:
        """Hand the state, acknowledgements and dedupe ids to a fresh run with a short history."""
        await workflow.wait_condition(workflow.all_handlers_finished)
        carry = LifecycleCarry(
            state=self._state or StreamState.IN_STARTUP_PROCESSING,
            url_redacted=self._url_redacted,
            startup_deadline_at=self._startup_deadline_at,
            acknowledged=sorted(self._acknowledged),
            failed=dict(sorted(self._failed.items())),
            seen_event_ids=list(self._seen),
            pending_events=list(self._inbox),
            events_received=self._events_received,
            health=self._supervisor.health if self._self_healing else None,
        )
        workflow.logger.info(
            "continuing as new",
            extra={
                "stream_id": self._params.stream_id,
                "state": carry.state.value,
                "history_length": workflow.info().get_current_history_length(),
            },
        )
        # memo and search attributes passed explicitly: not every server copies them to the new run
        workflow.continue_as_new(
            self._params.model_copy(update={"carry": carry}),
            memo={MEMO_URL: self._url_redacted} if self._url_redacted else None,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(STREAM_ID, self._params.stream_id),
                    SearchAttributePair(STREAM_STATE, carry.state.value),
                ]
            ),
        )

    async def _advance(
        self,
        state: StreamState,
        *,
        reason: str | None = None,
        event_id: str | None = None,
        source: str = "lifecycle",
    ) -> None:
        """Move to ``state`` when it is later than the current one, in the Web UI and in Postgres."""
        if self._state is not None and not may_advance(self._state, state):
            return
        self._state = state
        if state is StreamState.INACTIVE_ERROR:
            self._error_reason = reason
        workflow.logger.info(
            "state changed",
            extra={"stream_id": self._params.stream_id, "state": state.value, "reason": reason},
        )
        workflow.upsert_search_attributes([STREAM_STATE.value_set(state.value)])
        await workflow.execute_activity_method(
            LifecycleActivities.record_state,
            StateChange(
                stream_id=self._params.stream_id, state=state, reason=reason, event_id=event_id, source=source
            ),
            start_to_close_timeout=ACTIVITY_TIMEOUT,
            retry_policy=ACTIVITY_RETRY,
        )

    async def _send_stop(self, reason: str) -> None:
        command = StopCommand(
            command_id=str(workflow.uuid4()),
            stream_id=self._params.stream_id,
            reason=reason,
            issued_at=workflow.now(),
        )
        await workflow.execute_activity_method(
            LifecycleActivities.send_command,
            command,
            start_to_close_timeout=ACTIVITY_TIMEOUT,
            retry_policy=ACTIVITY_RETRY,
        )
