"""The ML service (``lookout-ml``): frames and commands in, one detection process per stream.

One consumer-group member reads both the commands and the frames topic. Both are keyed by stream
id, and the range assignor gives a member the same partitions of each, so the instance that runs a
stream's process is the one that receives its ``stop``. Frames go to their stream's bounded queue
(workers/ml/stream.py) without waiting for the model, so the loop stays responsive under overload.
A frame settles once its process is done with it (stored, dropped or discarded), and the shell
(workers/consumer_service.py) commits every second up to the oldest frame still unsettled.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Hashable
from multiprocessing.process import BaseProcess

from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from cachetools import LRUCache
from pydantic import ValidationError

from core.inference import detection_threads
from core.kafka import close_client, create_producer
from core.messages import (
    ErrorKind,
    EventKind,
    FrameHeaders,
    Service,
    StartCommand,
    StreamFigures,
    StreamOptions,
    WatchCommand,
    parse_command,
)
from core.metrics import LIVE_FRAMES_DROPPED, LIVE_FRAMES_PUBLISHED, forget_stream
from core.settings import Settings
from core.states import StreamState
from workers.consumer_service import ConsumerService, RecordHandler
from workers.entrypoint import run_service
from workers.ml.engine import EngineKey
from workers.ml.engines import Engines
from workers.ml.preload import prepare_default_model, start_preloading
from workers.ml.stream import QueuedFrame, StreamProcess, StreamStats

log = logging.getLogger(__name__)

FINISHED_STREAMS_KEPT = 10_000  # remembered so that late frames of a stopped stream start nothing
COMMIT_INTERVAL_S = 1.0


class MLHandler(RecordHandler):
    """Runs detection for every stream this member owns (a ``ConsumerService`` handler)."""

    name = "ml"
    role = "ml"
    publishes = Service.ML
    # co-partitioning: the member that owns a stream's commands partition owns its frames partition
    assignors = (RangePartitionAssignor,)
    commit_interval_s = COMMIT_INTERVAL_S

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # a frame still busy after this much of the ack deadline is abandoned so the ack is in time
        self.stop_grace_s = max(1.0, settings.ack_deadline_s / 2)
        self.streams: dict[str, StreamProcess] = {}
        self.finished: LRUCache[str, StreamStats] = LRUCache(FINISHED_STREAMS_KEPT)
        self._ending: dict[str, asyncio.Task[str | None]] = {}
        # partition of each running stream: the same number on both topics (co-partitioned)
        self._partition_of: dict[str, int] = {}
        self._cores = settings.ml_cores or len(os.sched_getaffinity(0))
        self._preparing: BaseProcess | None = None
        # one engine per model in use, shared by the streams' processes (None: a model in each)
        self.engines: Engines | None = None
        self._live_in_flight: dict[str, int] = {}  # live frames of each stream not yet acked by Kafka
        # live frames go on a producer of their own: the leader's ack is enough for them, and their
        # JPEGs stay out of the batches of the stream's state events
        self._live_producer: AIOKafkaProducer | None = None
        self._live_producer_lock = asyncio.Lock()

    def topics(self, settings: Settings) -> list[str]:
        return [settings.topic_commands, settings.topic_frames]

    def produced_topics(self, settings: Settings) -> list[str]:
        return [settings.topic_events, settings.topic_live]

    async def open(self, shell: ConsumerService) -> None:
        """Start preloading the detection processes' imports and the default model's export."""
        await super().open(shell)
        start_preloading(self.settings)
        self._preparing = prepare_default_model(self.settings)
        if self.settings.ml_engine == "shared":
            self.engines = Engines(self.settings, self._engine_failed)

    async def close(self) -> None:
        """Let every process finish its frame in hand. Streams are not acknowledged: the service
        stopping is not a stream stopping, and frames not yet processed stay uncommitted so the next
        instance detects them."""
        await self._hand_over(list(self.streams))
        if self.engines is not None:
            await self.engines.close()
        if self._live_producer is not None:
            await close_client(self._live_producer, "live producer")
        if self._preparing is not None and self._preparing.is_alive():
            self._preparing.terminate()  # an export cut short leaves nothing: the next start makes it
            await asyncio.to_thread(self._preparing.join, 5.0)

    def heartbeat_rate(self, figures: StreamFigures) -> int | None:
        return figures.frames_processed

    # --- consuming ----------------------------------------------------------------------------------

    async def handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Frames go to their stream's queue without waiting for the model; commands act at once."""
        if record.topic == self.settings.topic_commands:
            self._on_command(record, self.shell.token(record))
        else:
            self._on_frame(record, self.shell.token(record))

    def _on_frame(self, record: ConsumerRecord[bytes, bytes], token: tuple[TopicPartition, int]) -> None:
        try:
            headers = FrameHeaders.from_kafka(record.headers)
        except (ValidationError, UnicodeDecodeError) as err:
            self.shell.reject(record, f"frame without valid headers: {type(err).__name__}")
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
            self.shell.reject(record, f"malformed command: {err.error_count()} validation error(s)")
            return
        stream_id = command.stream_id
        if isinstance(command, WatchCommand):
            if stream_id in self.streams:  # the frames of the stream come here (co-partitioning)
                self.streams[stream_id].watch(command.for_s)
            self.frame_settled(token)
            return
        if isinstance(command, StartCommand):
            if not command.is_for(Service.ML):
                pass
            elif command.replace:
                self.shell.spawn(
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
        self.shell.spawn(self._acknowledge_stop(stream_id, command.command_id, token))

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

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        """Stop the streams of partitions moving to another member (the shell commits what they finished)."""
        moving = {tp.partition for tp in partitions}
        await self._hand_over([sid for sid in self.streams if self._partition_of.get(sid) in moving])

    # --- streams ------------------------------------------------------------------------------------

    def _start_stream(
        self, stream_id: str, options: StreamOptions | None, partition: int
    ) -> StreamProcess | None:
        link = None if self.engines is None else self.engines.link
        threads = (
            1 if link else detection_threads(self._cores, len(self.streams) + 1, self.settings.ml_threads)
        )
        stream = StreamProcess(self.settings, stream_id, options, self, threads=threads, link=link)
        try:
            stream.start()
        except Exception as err:  # e.g. out of memory or processes: report it, keep serving others
            log.exception("detection process did not start", extra={"stream_id": stream_id})
            self._remember_finished(stream_id, stream.stats)
            reason = f"detection process did not start: {type(err).__name__}: {err}"
            self.shell.spawn(
                self._publish(stream_id, EventKind.ERROR, error=reason, error_kind=ErrorKind.PROCESS)
            )
            return None
        self.streams[stream_id] = stream
        self._partition_of[stream_id] = partition
        self._share_cores()
        return stream

    def _share_cores(self) -> None:
        """Give every running detection process its share of the cores (core/inference.py); with a
        shared engine, the engine has them all and each stream's process one thread."""
        if self.engines is not None:
            return
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
                if self.engines is not None:
                    self.engines.release(stream_id)
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

    # --- StreamListener -----------------------------------------------------------------------------

    def frame_settled(self, token: Hashable) -> None:
        self.shell.settle(token)

    def first_frame_processed(self, stream_id: str) -> None:
        log.info("first frame processed", extra={"stream_id": stream_id})
        self.shell.spawn(self._publish(stream_id, EventKind.PROGRESS, state=StreamState.ML_STARTED))

    def stream_failed(self, stream_id: str, reason: str, *, fatal: bool = False) -> None:
        log.error("stream failed", extra={"stream_id": stream_id, "error": reason, "fatal": fatal})
        kind = ErrorKind.FATAL if fatal else ErrorKind.PROCESS
        self.shell.spawn(self._publish(stream_id, EventKind.ERROR, error=reason, error_kind=kind))
        self._end_stream(stream_id)

    def stream_closed(self, stream_id: str) -> None:
        self._end_stream(stream_id)

    def engine_wanted(self, stream_id: str, key: EngineKey) -> None:
        if self.engines is not None and stream_id in self.streams:
            self.engines.use(stream_id, key)

    def live_frame(self, stream_id: str, headers: FrameHeaders, jpeg: bytes) -> None:
        """An annotated frame of a watched stream: to the live topic, never holding up detection (a
        stream with ``live_pending_frames`` still in flight drops it)."""
        if self._live_in_flight.get(stream_id, 0) >= self.settings.live_pending_frames:
            LIVE_FRAMES_DROPPED.labels("ml").inc()
            return
        self._live_in_flight[stream_id] = self._live_in_flight.get(stream_id, 0) + 1
        self.shell.spawn(self._publish_live(stream_id, headers, jpeg))

    async def _publish_live(self, stream_id: str, headers: FrameHeaders, jpeg: bytes) -> None:
        try:
            producer = await self._live_sender()
            await producer.send_and_wait(
                self.settings.topic_live, jpeg, key=stream_id.encode(), headers=headers.to_kafka()
            )
            LIVE_FRAMES_PUBLISHED.inc()
        except Exception as err:  # a live frame is worth nothing a moment later: no retry
            LIVE_FRAMES_DROPPED.labels("ml").inc()
            log.debug("live frame not published", extra={"stream_id": stream_id, "error": str(err)})
        finally:
            left = self._live_in_flight.get(stream_id, 1) - 1
            if left > 0:
                self._live_in_flight[stream_id] = left
            else:
                self._live_in_flight.pop(stream_id, None)

    async def _live_sender(self) -> AIOKafkaProducer:
        async with self._live_producer_lock:
            if self._live_producer is None:
                producer = create_producer(self.settings, client_id="lookout-ml-live", idempotent=False)
                try:
                    await producer.start()
                except BaseException:
                    await close_client(producer, "live producer")
                    raise
                self._live_producer = producer
            return self._live_producer

    def _engine_failed(self, stream_ids: list[str], reason: str) -> None:
        """The model of an engine does not load: its streams fail (no restart can help them)."""
        for stream_id in stream_ids:
            self.stream_failed(stream_id, reason, fatal=True)

    # --- publishing ---------------------------------------------------------------------------------

    async def _publish(
        self,
        stream_id: str,
        kind: EventKind,
        *,
        state: StreamState | None = None,
        error: str | None = None,
        error_kind: ErrorKind | None = None,
    ) -> None:
        await self.shell.events.publish(stream_id, kind, state=state, error=error, error_kind=error_kind)


def ml_service(settings: Settings, *, group_id: str | None = None) -> ConsumerService:
    """The ML service: its handler in the consumer-service shell."""
    return ConsumerService(settings, MLHandler(settings), group_id=group_id)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run the ML service until ``stop`` is set."""
    await ml_service(settings).run(stop)


def main() -> None:
    """Console script ``lookout-ml``."""
    run_service("ml", serve, metrics_port=lambda s: s.metrics_port_ml)
