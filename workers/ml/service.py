"""The ML service (``lookout-ml``): frames and commands in, one detection process per stream.

One consumer-group member reads both the commands and the frames topic. Both are keyed by stream
id, and the range assignor gives a member the same partitions of each, so the instance that runs a
stream's process is the one that receives its ``stop``. Frames go to their stream's bounded queue
(workers/ml/stream.py) without waiting for the model, so the loop stays responsive under overload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Collection, Hashable
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import cast

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from core.inference import detection_threads
from core.kafka import (
    ConsumerLagReporter,
    close_client,
    consumer_group,
    create_consumer,
    create_producer,
    ensure_topics,
)
from core.kafka_gaps import OffsetGapGuard
from core.messages import (
    ErrorKind,
    EventKind,
    FrameHeaders,
    Service,
    StartCommand,
    StreamFigures,
    StreamOptions,
    parse_command,
)
from core.metrics import BAD_MESSAGES, forget_stream
from core.retry import KAFKA_DOWN, retrying
from core.settings import Settings
from core.states import StreamState
from workers.background import BackgroundTasks
from workers.dead_letters import dead_letter
from workers.entrypoint import run_service
from workers.ml.offsets import OffsetTracker
from workers.ml.preload import prepare_default_model, start_preloading
from workers.ml.stream import QueuedFrame, StreamProcess, StreamStats
from workers.state_events import Heartbeats, StateEventPublisher

log = logging.getLogger(__name__)

FINISHED_STREAMS_KEPT = 10_000  # remembered so that late frames of a stopped stream start nothing
COMMIT_INTERVAL_S = 1.0


class MLService:
    """Runs detection for every stream this member owns and publishes ML's state events."""

    def __init__(self, settings: Settings, *, group_id: str | None = None) -> None:
        self.settings = settings
        self.group_id = group_id or consumer_group(settings, "ml")
        # a frame still busy after this much of the ack deadline is abandoned so the ack is in time
        self.stop_grace_s = max(1.0, settings.ack_deadline_s / 2)
        self.streams: dict[str, StreamProcess] = {}
        self.finished: OrderedDict[str, StreamStats] = OrderedDict()
        self._ending: dict[str, asyncio.Task[str | None]] = {}
        # partition of each running stream: the same number on both topics (co-partitioned)
        self._partition_of: dict[str, int] = {}
        self._offsets = OffsetTracker()
        self._background = BackgroundTasks()
        self._producer: AIOKafkaProducer | None = None
        self._events: StateEventPublisher | None = None
        self._heartbeats: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._in_order: OffsetGapGuard | None = None
        self._lag: ConsumerLagReporter | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._last_commit = 0.0
        self._cores = settings.ml_cores or len(os.sched_getaffinity(0))
        self._preparing: BaseProcess | None = None

    # --- lifecycle of the service -----------------------------------------------------------------

    async def start(self) -> None:
        """Start preloading the detection processes' imports, connect, consume commands and frames."""
        start_preloading(self.settings)
        self._preparing = prepare_default_model(self.settings)
        self._producer = create_producer(self.settings, client_id="lookout-ml")
        await self._producer.start()
        self._events = StateEventPublisher(self.settings, self._producer, Service.ML)
        beats = Heartbeats(
            self._events, self.settings.heartbeat_interval_s, self.figures, lambda f: f.frames_processed
        )
        self._heartbeats = asyncio.create_task(beats.run(), name="ml-heartbeats")
        self._consumer = create_consumer(
            self.settings, group_id=self.group_id, client_id="lookout-ml", assignors=(RangePartitionAssignor,)
        )
        self._consumer.subscribe(
            [self.settings.topic_commands, self.settings.topic_frames], listener=_Rebalance(self)
        )
        await self._consumer.start()
        self._lag = ConsumerLagReporter(self._consumer, self.group_id)
        self._in_order = OffsetGapGuard(
            self._consumer,
            wait_s=self.settings.kafka_gap_wait_s,
            lossy_topics=frozenset({self.settings.topic_frames}),
        )
        self._loop_task = asyncio.create_task(self._consume(), name="ml-consume")
        log.info("ml service started", extra={"group_id": self.group_id})

    async def close(self) -> None:
        """Stop consuming, let every process finish its frame in hand, commit, disconnect.

        Streams are not acknowledged: the service stopping is not a stream stopping, and frames not
        yet processed stay uncommitted so the next instance detects them.
        """
        for task in (self._loop_task, self._heartbeats):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._hand_over(list(self.streams))
        if self._preparing is not None and self._preparing.is_alive():
            self._preparing.terminate()  # an export cut short leaves nothing: the next start makes it
            await asyncio.to_thread(self._preparing.join, 5.0)
        await self._background.finish()
        if self._consumer is not None:
            await self._commit(force=True)
            await close_client(self._consumer, "ml consumer")
        if self._producer is not None:
            await close_client(self._producer, "ml producer")
        log.info("ml service stopped")

    async def run_until(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; raises when consuming fails for good."""
        assert self._loop_task is not None, "start() first"
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter, self._loop_task], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if self._loop_task.done() and not self._loop_task.cancelled():
            self._loop_task.result()  # re-raises what ended the loop

    async def __aenter__(self) -> MLService:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- consuming ----------------------------------------------------------------------------------

    async def _consume(self) -> None:
        assert self._in_order is not None and self._lag is not None
        while True:
            # a broker restarting: the consumer reconnects by itself
            async for attempt in retrying(self.settings, "fetch", retry=KAFKA_DOWN):
                with attempt:
                    batch = await self._in_order.getmany(timeout_ms=200, max_records=200)
            for tp, records in batch.items():
                for record in records:
                    self._offsets.seen(tp, record.offset)
                    if tp.topic == self.settings.topic_commands:
                        self._on_command(record, (tp, record.offset))
                    else:
                        self._on_frame(record, (tp, record.offset))
            await self._commit()
            await self._lag.update()

    def _on_frame(self, record: ConsumerRecord[bytes, bytes], token: tuple[TopicPartition, int]) -> None:
        try:
            headers = FrameHeaders.from_kafka(record.headers)
        except (ValidationError, UnicodeDecodeError) as err:
            BAD_MESSAGES.labels("ml", record.topic).inc()
            log.error(
                "frame without valid headers skipped",
                extra={"offset": record.offset, "error": type(err).__name__},
            )
            self._background.spawn(
                self._dead_letter(record, f"frame without valid headers: {type(err).__name__}", token)
            )
            return
        stream_id = headers.stream_id
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id in self.finished or stream_id in self._ending:
                self.frame_settled(token)  # a late frame of a stopped stream
                return
            # its start command may come later
            stream = self._start_stream(stream_id, None, token[0].partition)
            if stream is None:
                self.frame_settled(token)
                return
        stream.offer(QueuedFrame(token=token, headers=headers, jpeg=record.value or b""))

    def _on_command(self, record: ConsumerRecord[bytes, bytes], token: tuple[TopicPartition, int]) -> None:
        try:
            command = parse_command(record.value or b"")
        except ValidationError as err:
            BAD_MESSAGES.labels("ml", record.topic).inc()
            # the value may hold a camera URL: say where it was and what failed, never what it says
            log.error(
                "unreadable command skipped", extra={"offset": record.offset, "errors": err.error_count()}
            )
            reason = f"malformed command: {err.error_count()} validation error(s)"
            self._background.spawn(self._dead_letter(record, reason, token))
            return
        stream_id = command.stream_id
        if isinstance(command, StartCommand):
            if not command.is_for(Service.ML):
                pass
            elif command.replace:
                self._background.spawn(
                    self._restart_stream(stream_id, command.options, token[0].partition, command.reason)
                )
            elif stream_id in self.streams:
                self.streams[stream_id].update_options(command.options)
            elif stream_id in self.finished or stream_id in self._ending:
                log.info("start of a stopped stream ignored", extra={"stream_id": stream_id})
            else:
                self._start_stream(stream_id, command.options, token[0].partition)
            self.frame_settled(token)
            return
        self._background.spawn(self._acknowledge_stop(stream_id, command.command_id, token))

    async def _acknowledge_stop(
        self, stream_id: str, command_id: str, token: tuple[TopicPartition, int]
    ) -> None:
        """Stop the stream's process (if any), then publish ML's acknowledgement."""
        task = self._end_stream(stream_id)
        error = await asyncio.shield(task) if task is not None else None
        if task is None:
            self._remember_finished(stream_id, StreamStats())  # never seen: ignore its late frames
        await self._publish(stream_id, EventKind.ACK, error=error)
        log.info(
            "stop acknowledged", extra={"stream_id": stream_id, "command_id": command_id, "error": error}
        )
        self.frame_settled(token)

    async def _commit(self, *, force: bool = False) -> None:
        assert self._consumer is not None
        now = time.monotonic()
        if not force and now - self._last_commit < COMMIT_INTERVAL_S:
            return
        self._last_commit = now
        offsets = self._offsets.to_commit(self._consumer.assignment())
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as err:
            log.warning("offset commit failed", extra={"error": str(err)})
            return
        self._offsets.committed(offsets)

    async def partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        """Stop the streams of partitions moving to another member, commit what they finished."""
        moving = {tp.partition for tp in revoked}
        await self._hand_over([sid for sid in self.streams if self._partition_of.get(sid) in moving])
        await self._commit(force=True)
        self._offsets.forget(revoked)

    # --- streams ------------------------------------------------------------------------------------

    def _start_stream(
        self, stream_id: str, options: StreamOptions | None, partition: int
    ) -> StreamProcess | None:
        threads = detection_threads(self._cores, len(self.streams) + 1, self.settings.ml_threads)
        stream = StreamProcess(self.settings, stream_id, options, self, threads=threads)
        try:
            stream.start()
        except Exception as err:  # e.g. out of memory or processes: report it, keep serving others
            log.exception("detection process did not start", extra={"stream_id": stream_id})
            self._remember_finished(stream_id, stream.stats)
            reason = f"detection process did not start: {type(err).__name__}: {err}"
            self._background.spawn(
                self._publish(stream_id, EventKind.ERROR, error=reason, error_kind=ErrorKind.PROCESS)
            )
            return None
        self.streams[stream_id] = stream
        self._partition_of[stream_id] = partition
        self._share_cores()
        return stream

    def _share_cores(self) -> None:
        """Give every running detection process its share of the cores (core/inference.py)."""
        threads = detection_threads(self._cores, len(self.streams), self.settings.ml_threads)
        for stream in self.streams.values():
            stream.set_threads(threads)

    def _end_stream(
        self, stream_id: str, *, handing_over: bool = False, restarting: bool = False
    ) -> asyncio.Task[str | None] | None:
        """Stop a stream's process once, however many stops, failures and shutdowns ask for it.

        ``handing_over``: this member is giving the stream up (shutdown, rebalance), not ending it;
        its unfinished frames stay uncommitted and a later frame may start it again.
        ``restarting``: a new process takes over here; the stream is not remembered as finished.
        """
        if stream_id in self._ending:
            return self._ending[stream_id]
        stream = self.streams.get(stream_id)
        if stream is None:
            return None

        async def end() -> str | None:
            try:
                return await stream.stop(self.stop_grace_s, settle_unfinished=not handing_over)
            finally:
                self.streams.pop(stream_id, None)
                self._partition_of.pop(stream_id, None)
                forget_stream(stream_id)  # ended here, or now another member's to count
                if not (handing_over or restarting):
                    self._remember_finished(stream_id, stream.stats)
                self._ending.pop(stream_id, None)
                self._share_cores()

        task = asyncio.create_task(end(), name=f"ml-stop-{stream_id}")
        self._ending[stream_id] = task
        return task

    async def _restart_stream(
        self, stream_id: str, options: StreamOptions, partition: int, reason: str | None
    ) -> None:
        """A restart from the lifecycle: replace whatever process this service holds for the stream."""
        log.info("restart: replacing the detection process", extra={"stream_id": stream_id, "reason": reason})
        self.finished.pop(stream_id, None)
        ending = self._end_stream(stream_id, restarting=True) or self._ending.get(stream_id)
        if ending is not None:
            await asyncio.gather(ending, return_exceptions=True)
        if stream_id not in self.streams:  # a frame may have started it meanwhile
            self._start_stream(stream_id, options, partition)

    def figures(self) -> dict[str, StreamFigures]:
        """The live figures of every stream whose detection process runs here (for the heartbeats).

        Only once its process is ready: a stream started by a frame may turn out to have no row or to
        have ended (the process then closes at once), and no heartbeat may speak for such a stream.
        """
        return {stream_id: stream.figures() for stream_id, stream in self.streams.items() if stream.ready}

    async def _hand_over(self, stream_ids: list[str]) -> None:
        """Stop these streams' processes without acknowledging: another member (or run) takes over."""
        tasks = [t for sid in stream_ids if (t := self._end_stream(sid, handing_over=True)) is not None]
        if tasks:
            log.info("handing streams over", extra={"streams": stream_ids})
            await asyncio.gather(*tasks, return_exceptions=True)

    def _remember_finished(self, stream_id: str, stats: StreamStats) -> None:
        self.finished[stream_id] = stats
        self.finished.move_to_end(stream_id)
        while len(self.finished) > FINISHED_STREAMS_KEPT:
            self.finished.popitem(last=False)

    # --- StreamListener -----------------------------------------------------------------------------

    def frame_settled(self, token: Hashable) -> None:
        tp, offset = cast(tuple[TopicPartition, int], token)
        self._offsets.settle(tp, offset)

    def first_frame_processed(self, stream_id: str) -> None:
        log.info("first frame processed", extra={"stream_id": stream_id})
        self._background.spawn(self._publish(stream_id, EventKind.PROGRESS, state=StreamState.ML_STARTED))

    def stream_failed(self, stream_id: str, reason: str, *, fatal: bool = False) -> None:
        log.error("stream failed", extra={"stream_id": stream_id, "error": reason, "fatal": fatal})
        kind = ErrorKind.FATAL if fatal else ErrorKind.PROCESS
        self._background.spawn(self._publish(stream_id, EventKind.ERROR, error=reason, error_kind=kind))
        self._end_stream(stream_id)

    def stream_closed(self, stream_id: str) -> None:
        self._end_stream(stream_id)

    # --- publishing ---------------------------------------------------------------------------------

    async def _dead_letter(
        self, record: ConsumerRecord[bytes, bytes], reason: str, token: tuple[TopicPartition, int]
    ) -> None:
        """Copy a record this service cannot use to the dead-letter topic, then let its offset go."""
        assert self._producer is not None
        await dead_letter(self._producer, self.settings, record, reason, group=self.group_id, service="ml")
        self.frame_settled(token)

    async def _publish(
        self,
        stream_id: str,
        kind: EventKind,
        *,
        state: StreamState | None = None,
        error: str | None = None,
        error_kind: ErrorKind | None = None,
    ) -> None:
        assert self._events is not None
        await self._events.publish(stream_id, kind, state=state, error=error, error_kind=error_kind)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands the streams of revoked partitions over before the group moves them."""

    def __init__(self, service: MLService) -> None:
        self._service = service

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        if revoked:
            await self._service.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        log.info(
            "partitions assigned",
            extra={"partitions": sorted(f"{tp.topic}:{tp.partition}" for tp in assigned)},
        )


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run the ML service until ``stop`` is set."""
    await ensure_topics(settings)
    async with MLService(settings) as service:
        await service.run_until(stop)


def main() -> None:
    """Console script ``lookout-ml``."""
    run_service("ml", serve, metrics_port=lambda s: s.metrics_port_ml)
