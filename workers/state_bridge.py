"""The state-manager bridge (lookout-state-bridge): states topic → StreamLifecycle signals.

Every state event becomes a signal-with-start of its stream's workflow (id ``stream-<id>``); the
offset is committed only after Temporal accepted the signal, so an event is never lost, only
possibly delivered twice (the workflow dedupes by event id). While Temporal is unavailable the
bridge retries the same event with backoff and commits nothing. A message that is not a state
event is logged, counted, copied to the dead-letter topic and skipped, so one bad record can never
stop the partition or crash-loop the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from pydantic import ValidationError
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode
from tenacity import AsyncRetrying, retry_if_exception

from core.kafka import ConsumerLagReporter, close_client, consumer_group, create_consumer, create_producer
from core.kafka_gaps import OffsetGapGuard
from core.messages import StateEvent
from core.metrics import (
    BAD_MESSAGES,
    BRIDGE_DEAD_LETTERED,
    BRIDGE_LATE_EVENTS,
    BRIDGE_SIGNAL_RETRIES,
    BRIDGE_SIGNALLED,
)
from core.retry import Stopped, retrying
from core.settings import Settings
from core.temporal import connect_temporal
from workers.dead_letters import dead_letter
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
_KafkaClient = TypeVar("_KafkaClient", AIOKafkaConsumer, AIOKafkaProducer)


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


class StateBridge:
    """Consumes the states topic as one member of ``group_id`` and signals every event."""

    def __init__(
        self,
        settings: Settings,
        signal_event: Signaller,
        *,
        group_id: str | None = None,
        max_backoff_s: float = 30.0,
        max_unexpected_failures: int = 5,
    ) -> None:
        self._settings = settings
        self._signal_event = signal_event
        self._group_id = group_id or consumer_group(settings, "state-manager")
        self._max_backoff_s = max_backoff_s
        self._max_unexpected_failures = max_unexpected_failures
        self.assigned = asyncio.Event()  # set once the consumer has joined and owns partitions

    async def run(self, stop: asyncio.Event) -> None:
        """Bridge events until ``stop`` is set; a broker or Temporal outage only delays them."""
        producer: AIOKafkaProducer | None = None
        consumer: AIOKafkaConsumer | None = None
        try:
            producer = await self._started(
                lambda: create_producer(self._settings, client_id="lookout-state-bridge"), stop
            )
            consumer = await self._started(
                lambda: create_consumer(
                    self._settings,
                    self._settings.topic_states,
                    group_id=self._group_id,
                    client_id="lookout-state-bridge",
                ),
                stop,
            )
            log.info("state bridge started", extra={"group_id": self._group_id})
            lag = ConsumerLagReporter(consumer, self._group_id)
            in_order = OffsetGapGuard(consumer, wait_s=self._settings.kafka_gap_wait_s)
            while not stop.is_set():
                # the consumer recovers by itself from a broker outage; never let a fetch end the loop
                async for attempt in self._retrying("states fetch", stop):
                    with attempt:
                        batch = await in_order.getmany(timeout_ms=500, max_records=200)
                if consumer.assignment():
                    self.assigned.set()
                for tp, records in batch.items():
                    await self._handle_partition(consumer, producer, tp, records, stop)
                await lag.update()
        except Stopped:
            pass
        finally:
            for client, what in ((consumer, "state bridge consumer"), (producer, "state bridge producer")):
                if client is not None:
                    await close_client(client, what)
            log.info("state bridge stopped")

    def _retrying(self, what: str, stop: asyncio.Event, **options: Any) -> AsyncRetrying:
        return retrying(self._settings, what, stop_event=stop, max_s=self._max_backoff_s, **options)

    async def _started(self, make: Callable[[], _KafkaClient], stop: asyncio.Event) -> _KafkaClient:
        """A started Kafka client, made anew after each failed start while the broker is unreachable;
        raises ``Stopped`` when stopped first."""
        async for attempt in self._retrying("kafka client start", stop):
            with attempt:
                client = make()
                try:
                    await client.start()
                except Exception:
                    with contextlib.suppress(Exception):
                        await client.stop()
                    raise
                return client
        raise AssertionError("unreachable: retrying ends in a return or Stopped")

    async def _handle_partition(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        tp: TopicPartition,
        records: list[ConsumerRecord[bytes, bytes]],
        stop: asyncio.Event,
    ) -> None:
        done: int | None = None
        try:
            for record in records:
                await self._handle(producer, record, stop)
                done = record.offset
        finally:
            if done is not None:
                await self._commit(consumer, tp, done + 1)

    async def _handle(
        self, producer: AIOKafkaProducer, record: ConsumerRecord[bytes, bytes], stop: asyncio.Event
    ) -> None:
        """Return once the record is signalled or dead-lettered; raise ``Stopped`` if stopped first."""
        try:
            event = parse_state_event(record.value)
        except MalformedEvent as err:
            BAD_MESSAGES.labels("state-bridge", record.topic).inc()
            log.warning(
                "malformed state event skipped",
                extra={
                    "key": _key_text(record.key),
                    "partition": record.partition,
                    "offset": record.offset,
                    "reason": str(err),
                },
            )
            await self._dead_letter(producer, record, f"malformed: {err}", stop)
            return
        failure = await self._signal(event, stop)
        if failure is not None:
            await self._dead_letter(producer, record, failure, stop)

    async def _signal(self, event: StateEvent, stop: asyncio.Event) -> str | None:
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
            async for attempt in self._retrying(
                "signal", stop, retry=retry_if_exception(worth_retrying), context=context
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

    async def _dead_letter(
        self,
        producer: AIOKafkaProducer,
        record: ConsumerRecord[bytes, bytes],
        reason: str,
        stop: asyncio.Event,
    ) -> None:
        """Copy the record to the dead-letter topic with why and where from; retried while Kafka is down."""
        await dead_letter(
            producer,
            self._settings,
            record,
            reason,
            group=self._group_id,
            service="state-bridge",
            stop=stop,
            max_s=self._max_backoff_s,
        )
        BRIDGE_DEAD_LETTERED.inc()

    async def _commit(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
        try:
            await consumer.commit({tp: offset})
        except Exception as err:  # e.g. a rebalance: the events come again and the workflow dedupes them
            log.warning("offset commit failed", extra={"partition": tp.partition, "error": repr(err)})


def _key_text(key: bytes | None) -> str | None:
    return key.decode(errors="replace")[:100] if key is not None else None


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Connect to Temporal (retrying while it is down) and bridge until ``stop`` is set."""
    try:
        async for attempt in retrying(settings, "temporal connect", stop_event=stop):
            with attempt:
                client = await connect_temporal(settings)
    except Stopped:
        return
    await StateBridge(settings, partial(signal_with_start, client, settings)).run(stop)


def main() -> None:
    """Console script ``lookout-state-bridge``."""
    run_service("state-bridge", serve, metrics_port=lambda s: s.metrics_port_bridge)
