"""The runner service (``lookout-runner``): commands in, one capture process per stream, state events out.

It consumes the commands topic in its own consumer group. ``start`` spawns the stream's capture
process (a restart, ``replace``, first stops the one it may still hold); ``stop`` stops it
(cooperatively, then by force) and acknowledges on the states topic, also for a stream it does not
run, so the lifecycle never waits for a runner that never started. It publishes ``runner_started``
once a stream's first frame is out, a heartbeat per stream every ``heartbeat_interval_s``, and an
``error`` when a stream is lost (the camera's fault or the process's). Stopping the service, or
losing a stream's partition to another instance, stops its capture processes and reports nothing:
the lifecycle's watchdog hands the streams to whichever runner is there. A command's offset is
committed once it is carried out (a stop once acknowledged), so a command is never lost, only
possibly repeated; repeats are harmless. The Kafka side (clients, loop, commits, dead letters,
heartbeats) is the consumer-service shell's (workers/consumer_service.py); this is its handler.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import ConsumerRecord, TopicPartition
from cachetools import LRUCache
from cryptography.fernet import InvalidToken
from pydantic import ValidationError

from core.messages import (
    ErrorKind,
    EventKind,
    Service,
    StartCommand,
    StopCommand,
    StreamFigures,
    WatchCommand,
    parse_command,
)
from core.metrics import forget_stream
from core.redact import redact_url
from core.sealing import UrlSealer
from core.settings import Settings
from core.states import StreamState
from workers.consumer_service import ConsumerService, RecordHandler
from workers.entrypoint import run_service
from workers.runner.messages import CaptureSpec
from workers.runner.stream import CaptureProcess, StopOutcome, start_capture_server

log = logging.getLogger(__name__)

SEEN_COMMANDS = 10_000  # start command ids remembered to ignore redelivered duplicates


class RunnerHandler(RecordHandler):
    """Consumes commands and keeps one capture process per running stream (a ``ConsumerService`` handler)."""

    name = "runner"
    role = "runner"
    publishes = Service.RUNNER

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.streams: dict[str, CaptureProcess] = {}
        self._stops: dict[str, asyncio.Task[None]] = {}
        self._seen_starts: LRUCache[str, None] = LRUCache(SEEN_COMMANDS)
        self._partition_of: dict[str, int] = {}  # commands partition of each running stream
        self._sealer = UrlSealer(settings)  # only the runner opens the camera URLs

    async def open(self, shell: ConsumerService) -> None:
        """Start the capture processes' preloading fork server (workers/runner/stream.py)."""
        await super().open(shell)
        start_capture_server()

    def topics(self, settings: Settings) -> list[str]:
        return [settings.topic_commands]

    def produced_topics(self, settings: Settings) -> list[str]:
        return [settings.topic_frames]

    def heartbeat_rate(self, figures: StreamFigures) -> int | None:
        return figures.frames_published

    # --- commands ---------------------------------------------------------------------------------

    async def handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """A start is carried out before the next record; a stop runs beside the loop and its record
        settles once it is acknowledged."""
        try:
            command = parse_command(record.value or b"")
        except ValidationError as exc:
            self.shell.reject(record, f"malformed command: {exc.error_count()} validation error(s)")
            return
        if isinstance(command, StartCommand):
            if command.is_for(Service.RUNNER):
                await self._start(command, record.partition)
            self.shell.settle(record)
        elif isinstance(command, WatchCommand):  # the live view is ML's
            self.shell.settle(record)
        else:
            self._begin_stop(command, record)

    async def _start(self, command: StartCommand, partition: int) -> None:
        stream_id = command.stream_id
        if command.command_id in self._seen_starts:
            log.info(
                "duplicate start ignored", extra={"stream_id": stream_id, "command_id": command.command_id}
            )
            return
        self._seen_starts[command.command_id] = None
        pending_stop = self._stops.get(stream_id)
        if pending_stop is not None:  # stop then start of the same stream: the stop finishes first
            await asyncio.shield(pending_stop)
        if stream_id in self.streams and command.replace:
            log.info(
                "restart: replacing the capture process",
                extra={"stream_id": stream_id, "reason": command.reason},
            )
            await self._stop_quietly([stream_id])
        if stream_id in self.streams:
            log.info("stream already running; start ignored", extra={"stream_id": stream_id})
            return
        try:
            url = self._sealer.open(command.url_sealed)
        except InvalidToken:
            # sealed with a key this runner does not have (or altered): no restart can open it
            log.error("camera URL cannot be opened", extra={"stream_id": stream_id})
            await self._publish(
                stream_id,
                EventKind.ERROR,
                error="the camera URL cannot be opened with this runner's secret keys",
                error_kind=ErrorKind.FATAL,
            )
            return
        spec = CaptureSpec(
            stream_id=stream_id,
            url=url,
            fps=command.options.fps or self.settings.runner_default_fps,
            settings=self.settings,
        )
        process = CaptureProcess(spec, on_started=self._on_started, on_failed=self._on_failed)
        self.streams[stream_id] = process
        self._partition_of[stream_id] = partition
        log.info(
            "starting stream",
            extra={"stream_id": stream_id, "url": redact_url(url), "fps": spec.fps},
        )
        try:
            await process.start()
        except Exception as exc:
            log.exception("capture process did not start", extra={"stream_id": stream_id})
            self._forget(stream_id)
            forget_stream(stream_id)
            await self._publish(
                stream_id,
                EventKind.ERROR,
                error=f"could not start the capture process: {exc!r}",
                error_kind=ErrorKind.PROCESS,
            )

    def _begin_stop(self, command: StopCommand, record: ConsumerRecord[bytes, bytes]) -> None:
        stream_id = command.stream_id
        previous = self._stops.get(stream_id)
        task = asyncio.create_task(self._stop(command, after=previous), name=f"stop {stream_id}")
        self._stops[stream_id] = task
        task.add_done_callback(lambda done: self._forget_stop(stream_id, done, record))

    async def _stop(self, command: StopCommand, *, after: asyncio.Task[None] | None) -> None:
        stream_id = command.stream_id
        if after is not None:
            await asyncio.shield(after)
        process = self.streams.get(stream_id)
        self._forget(stream_id)
        if process is None:
            outcome = StopOutcome()
            log.info("stop for a stream not running here; acknowledged", extra={"stream_id": stream_id})
        else:
            outcome = await process.stop()
            forget_stream(stream_id)  # after its last counts, which the child sends as it exits
            log.info("stream stopped", extra={"stream_id": stream_id, "error": outcome.error})
        await self._publish(stream_id, EventKind.ACK, error=outcome.error)

    def _forget_stop(
        self, stream_id: str, task: asyncio.Task[None], record: ConsumerRecord[bytes, bytes]
    ) -> None:
        if self._stops.get(stream_id) is task:
            del self._stops[stream_id]
        if not task.cancelled() and task.exception() is None:
            self.shell.settle(record)  # acknowledged: its offset may be committed

    # --- reports from capture processes -----------------------------------------------------------

    def _on_started(self, process: CaptureProcess) -> None:
        self.shell.spawn(
            self._publish(process.stream_id, EventKind.PROGRESS, state=StreamState.RUNNER_STARTED)
        )

    def _on_failed(self, process: CaptureProcess, reason: str) -> None:
        if self.streams.get(process.stream_id) is process:
            self._forget(process.stream_id)
            forget_stream(process.stream_id)  # on_failed comes once the process is reaped
        kind = ErrorKind.CAMERA if process.camera_failure else ErrorKind.PROCESS
        self.shell.spawn(self._publish(process.stream_id, EventKind.ERROR, error=reason, error_kind=kind))

    def figures(self) -> dict[str, StreamFigures]:
        """The live figures of every stream whose capture process runs here (for the heartbeats)."""
        now = time.time()
        figures = {}
        for stream_id, process in self.streams.items():
            if process.exited:
                continue
            counts = process.counts
            newest = counts.newest_capture_ts
            figures[stream_id] = StreamFigures(
                frames_read=counts.frames_read,
                frames_published=counts.frames_published,
                frames_dropped=counts.frames_dropped,
                reconnects=counts.reconnects,
                camera=counts.camera,
                newest_frame_age_s=round(max(0.0, now - newest), 3) if newest is not None else None,
            )
        return figures

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

    def _forget(self, stream_id: str) -> None:
        """The stream no longer runs here (its metrics go once its process is gone)."""
        self.streams.pop(stream_id, None)
        self._partition_of.pop(stream_id, None)

    # --- giving streams up: shutdown, partitions moving away --------------------------------------

    async def _stop_quietly(self, stream_ids: list[str]) -> None:
        """Stop these streams' capture processes and report nothing: the streams go on elsewhere (a
        restart here, another runner, this runner once it is back), driven by the lifecycle."""
        running = [self.streams[sid] for sid in stream_ids if sid in self.streams]
        for process in running:
            self._forget(process.stream_id)
        await asyncio.gather(*(p.stop() for p in running), return_exceptions=True)
        for process in running:
            forget_stream(process.stream_id)

    async def assigned(self, partitions: set[TopicPartition]) -> None:
        """Give up the streams whose commands partition went to another runner. (A rebalance revokes
        every partition first and gives most back: only those not given back have moved.)"""
        numbers = {tp.partition for tp in partitions}
        moving = [sid for sid, partition in self._partition_of.items() if partition not in numbers]
        if moving:
            log.info("handing streams over", extra={"streams": moving})
            await self._stop_quietly(moving)

    async def close(self) -> None:
        """Stop every capture process. The service stopping is not the streams stopping: nothing is
        reported, and they resume when a runner is back (the lifecycle's watchdog restarts them)."""
        await self._stop_quietly(list(self.streams))
        if self._stops:
            await asyncio.gather(*self._stops.values(), return_exceptions=True)


def runner_service(settings: Settings, *, group_id: str | None = None) -> ConsumerService:
    """The runner: its handler in the consumer-service shell."""
    return ConsumerService(settings, RunnerHandler(settings), group_id=group_id)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run the runner until ``stop`` is set; on the way out its capture processes are stopped."""
    await runner_service(settings).run(stop)


def main() -> None:
    """Console script ``lookout-runner``."""
    run_service("runner", serve, metrics_port=lambda s: s.metrics_port_runner)


if __name__ == "__main__":
    main()
