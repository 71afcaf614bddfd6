"""The state-manager bridge (lookout-state-bridge): states topic → StreamLifecycle signals.

Every state event becomes a signal-with-start of its stream's workflow (id ``stream-<id>``); the
offset is committed only after Temporal accepted the signal, so an event is never lost, only
possibly delivered twice (the workflow dedupes by event id). While Temporal is unavailable the
bridge retries the same event with backoff and commits nothing. A message that is not a state
event, or one Temporal rejects for good, is logged, counted, copied to the dead-letter topic and
skipped, so one bad record can never stop the partition or crash-loop the process. The Kafka side is
the consumer-service shell's (workers/consumer_service.py); this is its handler.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from functools import partial

from aiokafka import ConsumerRecord
from pydantic import ValidationError
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode
from tenacity import retry_if_exception

from core.messages import StateEvent
from core.metrics import BRIDGE_LATE_EVENTS, BRIDGE_SIGNAL_RETRIES, BRIDGE_SIGNALLED
from core.retry import Stopped, retrying
from core.settings import Settings
from core.temporal import connect_temporal
from workers.consumer_service import ConsumerService, RecordHandler
from workers.entrypoint import run_service
from workflows.starter import signal_with_start

log = logging.getLogger(__name__)

# Statuses that say "try again later"; any other error of a signal is about the event itself.
TRANSIENT_STATUSES = frozenset(
    {
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.ABORTED,
        RPCStatusCode.INTERNAL,
        RPCStatusCode.UNKNOWN,
        RPCStatusCode.CANCELLED,
    }
)

Signaller = Callable[[StateEvent], Awaitable[object]]


class MalformedEvent(ValueError):
    """A states-topic message that is not a usable state event; the message says why."""


def parse_state_event(value: bytes | None) -> StateEvent:
    """The state event in a record's value; raises ``MalformedEvent`` with a reason that never quotes it."""
    if not value:
        raise MalformedEvent("empty value")
    try:
        event = StateEvent.model_validate_json(value)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or 'value'}: {e['msg']}"
            for e in err.errors(include_input=False, include_url=False)
        )
        raise MalformedEvent(problems[:500]) from None
    try:
        uuid.UUID(event.stream_id)
    except ValueError:
        raise MalformedEvent("stream_id: not a UUID") from None
    return event


class BridgeHandler(RecordHandler):
    """Signals every state event to its stream's lifecycle (a ``ConsumerService`` handler)."""

    name = "state-bridge"
    role = "state-manager"

    def __init__(
        self,
        settings: Settings,
        signal_event: Signaller,
        *,
        max_backoff_s: float = 30.0,
        max_unexpected_failures: int = 5,
    ) -> None:
        self._settings = settings
        self._signal_event = signal_event
        self._max_backoff_s = max_backoff_s
        self._max_unexpected_failures = max_unexpected_failures

    def topics(self, settings: Settings) -> list[str]:
        return [settings.topic_states]

    async def handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Return once the record is signalled or dead-lettered; ``Stopped`` if stopped first."""
        try:
            event = parse_state_event(record.value)
        except MalformedEvent as err:
            self.shell.reject(record, f"malformed: {err}", key=_key_text(record.key))
            return
        failure = await self._signal(event)
        if failure is None:
            self.shell.settle(record)
        else:
            self.shell.dead_letter(record, failure)

    async def _signal(self, event: StateEvent) -> str | None:
        """Signal ``event`` until Temporal accepts it; the reason when it never can (to dead-letter)."""
        context = {
            "stream_id": event.stream_id,
            "event_id": event.event_id,
            "service": event.service.value,
            "kind": event.kind.value,
            "state": event.state.value if event.state else None,
        }
        unexpected = 0

        def worth_retrying(error: BaseException) -> bool:
            nonlocal unexpected
            if isinstance(error, WorkflowAlreadyStartedError):
                return False
            if isinstance(error, RPCError):
                transient = error.status in TRANSIENT_STATUSES
                if transient:
                    BRIDGE_SIGNAL_RETRIES.inc()
                return transient
            unexpected += 1
            return unexpected < self._max_unexpected_failures

        try:
            async for attempt in retrying(
                self._settings,
                "signal",
                stop_event=self.shell.stopping,
                max_s=self._max_backoff_s,
                retry=retry_if_exception(worth_retrying),
                context=context,
            ):
                with attempt:
                    await self._signal_event(event)
        except Stopped:
            raise
        except WorkflowAlreadyStartedError:
            # the stream's lifecycle has ended: a late acknowledgement or repeat changes nothing
            BRIDGE_LATE_EVENTS.inc()
            log.info("event after the lifecycle ended dropped", extra=context)
            return None
        except RPCError as err:
            log.error("signal rejected", extra={**context, "error": repr(err)})
            return f"signal rejected: {err.status.name}: {err.message}"[:500]
        except Exception as err:
            log.exception("signal failed", extra={**context, "attempts": unexpected})
            return f"signal failed {unexpected} times: {type(err).__name__}: {err}"[:500]
        BRIDGE_SIGNALLED.inc()
        log.info("state event signalled", extra=context)
        return None


def _key_text(key: bytes | None) -> str | None:
    return key.decode(errors="replace")[:100] if key is not None else None


def bridge_service(
    settings: Settings,
    signal_event: Signaller,
    *,
    group_id: str | None = None,
    max_backoff_s: float = 30.0,
    max_unexpected_failures: int = 5,
) -> ConsumerService:
    """The state bridge: its handler in the consumer-service shell."""
    handler = BridgeHandler(
        settings, signal_event, max_backoff_s=max_backoff_s, max_unexpected_failures=max_unexpected_failures
    )
    return ConsumerService(settings, handler, group_id=group_id)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Connect to Temporal (retrying while it is down) and bridge until ``stop`` is set."""
    try:
        async for attempt in retrying(settings, "temporal connect", stop_event=stop):
            with attempt:
                client = await connect_temporal(settings)
    except Stopped:
        return
    await bridge_service(settings, partial(signal_with_start, client, settings)).run(stop)


def main() -> None:
    """Console script ``lookout-state-bridge``."""
    run_service("state-bridge", serve, metrics_port=lambda s: s.metrics_port_bridge)
