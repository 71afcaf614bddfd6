"""One shell for Lookout's consuming services: the runner, ML and the state bridge are its handlers.

The shell owns what the three share, so each is written once:

- the Kafka clients, made anew and retried while the broker is unreachable until they connect or
  the service is stopped, and the service's topics made as declared when missing (core/topics.py);
- the consume loop, which hands every record to the handler in partition order;
- offsets: a handler *settles* a record when it is done with it (in any order: a frame stored by
  its stream's process, a stop once acknowledged), and the shell commits the lowest offset not yet
  settled of each partition at the handler's ``commit_interval_s`` (0: after every batch), when
  partitions are revoked, and on the way out. A record is never lost, only possibly repeated;
- dead-lettering: ``reject`` logs and counts a malformed record, copies it to the dead-letter topic
  with why and where from, then settles it, so one bad record never stops a partition;
- the consumer-lag gauge and the rebalance hooks; static group membership (``kafka_instance_id``),
  so that a restarted service takes its partitions back at once, not after the group drops its
  dead predecessor;
- for a service that runs streams (``publishes``), its state-event publisher and heartbeats.

One start/stop contract: ``run(stop)`` serves until ``stop`` is set (or the task is cancelled);
``async with`` starts and closes the same way. Closing lets the handler hand its streams over,
finishes background work, commits what is settled and closes the clients within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Coroutine, Hashable, Mapping
from types import TracebackType
from typing import Any, TypeAlias, TypeVar, cast

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.errors import KafkaError

from core.kafka import (
    CLOSE_TIMEOUT_S,
    ConsumerLagReporter,
    close_client,
    consumer_group,
    create_consumer,
    create_producer,
    ensure_topics,
)
from core.messages import Service, StreamFigures
from core.metrics import BAD_MESSAGES
from core.retry import KAFKA_DOWN, Stopped, retrying
from core.settings import Settings
from core.timeouts import within
from workers.background import BackgroundTasks
from workers.dead_letters import dead_letter
from workers.offsets import OffsetTracker
from workers.state_events import Heartbeats, StateEventPublisher

log = logging.getLogger(__name__)

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"
_Client = TypeVar("_Client", AIOKafkaConsumer, AIOKafkaProducer)


class RecordHandler:
    """What a consuming service does with its records; the shell calls it. Override what applies."""

    name: str = "consumer"  # in logs and metrics: runner, ml, state-bridge
    role: str = "consumer"  # the consumer group is <prefix>-<role>
    assignors: tuple[type[AbstractPartitionAssignor], ...] = (RoundRobinPartitionAssignor,)
    commit_interval_s: float = 0.0  # 0: commit what settled after every batch
    poll_timeout_ms: int = 200
    max_records: int = 200
    publishes: Service | None = None  # a stream-running service: state events and heartbeats

    def topics(self, settings: Settings) -> list[str]:
        """The topics this service consumes."""
        raise NotImplementedError

    def produced_topics(self, settings: Settings) -> list[str]:
        """Topics it writes besides the states and dead-letter topics (made before it starts)."""
        return []

    _shell: ConsumerService | None = None

    @property
    def shell(self) -> ConsumerService:
        """The service this handler runs in (producer, settle, reject, spawn, events)."""
        assert self._shell is not None, "not opened"
        return self._shell

    async def open(self, shell: ConsumerService) -> None:
        """Called once the producer is started, before the consumer joins its group; an override
        calls this one first."""
        self._shell = shell

    async def handle(self, record: Record) -> None:
        """Take one record; settle it through the shell once done with it."""
        raise NotImplementedError

    async def assigned(self, partitions: set[TopicPartition]) -> None:
        """After a rebalance gave this member ``partitions`` (all of its partitions)."""

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        """Before a rebalance takes ``partitions`` away; what settles here is committed right after."""

    async def close(self) -> None:
        """The service is stopping: give up what it holds (streams go on elsewhere)."""

    def figures(self) -> Mapping[str, StreamFigures]:
        """Live figures of each stream run here, for the heartbeats (``publishes`` services)."""
        return {}

    def heartbeat_rate(self, figures: StreamFigures) -> int | None:
        """The count whose rate is a heartbeat's ``fps``."""
        return None


class ConsumerService:
    """Runs one ``RecordHandler`` as a member of its consumer group."""

    def __init__(self, settings: Settings, handler: RecordHandler, *, group_id: str | None = None) -> None:
        self.settings = settings
        self.handler = handler
        self.group_id = group_id or consumer_group(settings, handler.role)
        self.assigned = asyncio.Event()  # set once the consumer owns partitions
        self.stopping = asyncio.Event()  # set when the service is asked to stop
        self.background = BackgroundTasks()
        self._offsets = OffsetTracker()
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._events: StateEventPublisher | None = None
        self._lag: ConsumerLagReporter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop_task: asyncio.Task[None] | None = None
        self._last_commit = 0.0

    # --- what handlers use ----------------------------------------------------------------------

    @property
    def producer(self) -> AIOKafkaProducer:
        assert self._producer is not None, "start() first"
        return self._producer

    @property
    def events(self) -> StateEventPublisher:
        """The state-event publisher of a ``publishes`` service."""
        assert self._events is not None, "the handler publishes no state events, or start() first"
        return self._events

    def settle(self, token: Hashable) -> None:
        """The record (a ``(TopicPartition, offset)`` token or the record itself) is done with."""
        if isinstance(token, ConsumerRecord):
            token = (TopicPartition(token.topic, token.partition), token.offset)
        tp, offset = cast(tuple[TopicPartition, int], token)
        self._offsets.settle(tp, offset)

    @staticmethod
    def token(record: Record) -> tuple[TopicPartition, int]:
        """The settle token of ``record``."""
        return TopicPartition(record.topic, record.partition), record.offset

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background; awaited when the service closes."""
        self.background.spawn(coro)

    def reject(self, record: Record, reason: str, **context: object) -> None:
        """A record this service cannot use: logged (where it was and why, never what it says: it may
        hold a camera URL), counted, copied to the dead-letter topic, then settled."""
        BAD_MESSAGES.labels(self.handler.name, record.topic).inc()
        log.warning(
            "malformed record dead-lettered",
            extra={
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "reason": reason,
                **context,
            },
        )
        self.dead_letter(record, reason)

    def dead_letter(self, record: Record, reason: str) -> None:
        """Copy ``record`` to the dead-letter topic in the background (retried while Kafka is down),
        then settle it."""

        async def copy() -> None:
            with contextlib.suppress(Stopped):
                await dead_letter(
                    self.producer,
                    self.settings,
                    record,
                    reason,
                    group=self.group_id,
                    service=self.handler.name,
                    stop=self.stopping,
                )
                self.settle(record)

        self.spawn(copy())

    # --- start and stop ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set or the task is cancelled; a broker outage only delays it."""
        stop = stop or asyncio.Event()
        try:
            await self.start(stop)
            await self.run_until(stop)
        except Stopped:
            pass
        finally:
            await self.close()

    async def start(self, stop: asyncio.Event | None = None) -> None:
        """Connect (retrying while the broker is down), then consume in a task of its own."""
        if stop is not None:
            self._tasks.append(asyncio.create_task(self._forward(stop), name=f"{self.handler.name}-stop"))
        settings, handler = self.settings, self.handler
        topics = [*handler.topics(settings), *handler.produced_topics(settings)]
        topics += [settings.topic_states, settings.topic_dead_letter]
        async for attempt in self._retrying("topics"):
            with attempt:
                await ensure_topics(settings, sorted(set(topics)), reconcile=False)
        self._producer = await self._started(
            lambda: create_producer(settings, client_id=f"lookout-{handler.name}")
        )
        if handler.publishes is not None:
            self._events = StateEventPublisher(settings, self._producer, handler.publishes)
            beats = Heartbeats(
                self._events, settings.heartbeat_interval_s, handler.figures, handler.heartbeat_rate
            )
            self._tasks.append(asyncio.create_task(beats.run(), name=f"{handler.name}-heartbeats"))
        await handler.open(self)

        def consumer() -> AIOKafkaConsumer:
            made = create_consumer(
                settings,
                group_id=self.group_id,
                client_id=f"lookout-{handler.name}",
                assignors=handler.assignors,
                static=True,
            )
            made.subscribe(handler.topics(settings), listener=_Rebalance(self))
            return made

        self._consumer = await self._started(consumer)
        self._lag = ConsumerLagReporter(self._consumer, self.group_id)
        self._loop_task = asyncio.create_task(self._consume(), name=f"{handler.name}-consume")
        log.info("consuming", extra={"service": handler.name, "group": self.group_id, "topics": topics})

    async def run_until(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; raises what ended the consume loop when it failed."""
        assert self._loop_task is not None, "start() first"
        waiter = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([waiter, self._loop_task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if self._loop_task.done() and not self._loop_task.cancelled():
            self._loop_task.result()

    async def close(self) -> None:
        """Stop consuming, let the handler give up what it holds, commit, disconnect. Idempotent."""
        self.stopping.set()
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None]
        self._loop_task, self._tasks = None, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.handler.close()
        # a broker that is gone must not hold the stop: publishes, the last commit and the clients'
        # stops share one bound
        deadline = time.monotonic() + CLOSE_TIMEOUT_S

        def left() -> float:
            return max(1.0, deadline - time.monotonic())

        if abandoned := await self.background.finish(left()):
            log.warning(
                "background work abandoned at stop", extra={"service": self.handler.name, "tasks": abandoned}
            )
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                await within(self._commit(consumer, force=True), left())
            except TimeoutError:
                log.warning(
                    "last offset commit abandoned: no broker answered", extra={"service": self.handler.name}
                )
            await close_client(consumer, f"{self.handler.name} consumer", timeout_s=left())
        producer, self._producer = self._producer, None
        if producer is not None:
            await close_client(producer, f"{self.handler.name} producer", timeout_s=left())
        log.info("stopped", extra={"service": self.handler.name})

    async def __aenter__(self) -> ConsumerService:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- inside -----------------------------------------------------------------------------------

    async def _forward(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.stopping.set()

    def _retrying(self, what: str) -> Any:
        return retrying(self.settings, f"{self.handler.name} {what}", stop_event=self.stopping)

    async def _started(self, make: Callable[[], _Client]) -> _Client:
        """A started Kafka client, made anew after each failed start; ``Stopped`` when stopped first."""
        async for attempt in self._retrying("kafka client start"):
            with attempt:
                client = make()
                try:
                    await client.start()
                except BaseException:
                    await close_client(client, f"{self.handler.name} client that did not start", timeout_s=5)
                    raise
                return client
        raise AssertionError("unreachable: retrying ends in a return or Stopped")

    async def _consume(self) -> None:
        consumer, lag, handler = self._consumer, self._lag, self.handler
        assert consumer is not None and lag is not None
        while True:
            # a broker restarting: the consumer reconnects by itself
            async for attempt in retrying(self.settings, f"{handler.name} fetch", retry=KAFKA_DOWN):
                with attempt:
                    batch = await consumer.getmany(
                        timeout_ms=handler.poll_timeout_ms, max_records=handler.max_records
                    )
            if consumer.assignment():
                self.assigned.set()
            for tp, records in batch.items():
                for record in records:
                    self._offsets.seen(tp, record.offset)
                    await handler.handle(record)
            await self._commit(consumer)
            await lag.update()

    async def _commit(self, consumer: AIOKafkaConsumer, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_commit < self.handler.commit_interval_s:
            return
        self._last_commit = now
        offsets = self._offsets.to_commit(consumer.assignment())
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except KafkaError as err:
            # e.g. a rebalance: the records come again, and every handler is idempotent
            log.warning("offset commit failed", extra={"service": self.handler.name, "error": repr(err)})
            return
        self._offsets.committed(offsets)

    async def partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        await self.handler.revoked(set(revoked))
        if self._consumer is not None:
            await self._commit(self._consumer, force=True)
        self._offsets.forget(revoked)

    async def partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        log.info(
            "partitions assigned",
            extra={
                "service": self.handler.name,
                "partitions": sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
            },
        )
        if assigned:
            self.assigned.set()
        await self.handler.assigned(set(assigned))


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: ConsumerService) -> None:
        self._service = service

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        await self._service.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        await self._service.partitions_assigned(assigned)
