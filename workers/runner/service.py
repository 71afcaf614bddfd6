"""The runner service (``lookout-runner``): commands in, one capture process per stream, state events out.

It consumes the commands topic in its own consumer group. ``start`` spawns the stream's capture
process; ``stop`` stops it (cooperatively, then by force) and acknowledges on the states topic, also
for a stream it does not run, so the lifecycle never waits for a runner that never started. It
publishes ``runner_started`` once a stream's first frame is out and an ``error`` when a stream is lost
or its process dies. Offsets are committed after a batch's commands are carried out (stops included),
so a command is never lost, only possibly repeated; repeats are harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from core.kafka import ConsumerLagReporter, create_consumer, create_producer, ensure_topics
from core.messages import EventKind, Service, StartCommand, StateEvent, StopCommand, parse_command
from core.metrics import BAD_MESSAGES, forget_stream
from core.redact import redact_url
from core.retry import KAFKA_DOWN, retrying
from core.settings import Settings
from core.states import StreamState
from workers.entrypoint import run_service
from workers.runner.messages import CaptureSpec
from workers.runner.stream import CaptureProcess, StopOutcome

log = logging.getLogger(__name__)

RUNNER_GROUP = "lookout-runner"
SEEN_COMMANDS = 10_000  # start command ids remembered to ignore redelivered duplicates


class RunnerService:
    """Consumes commands and keeps one capture process per running stream."""

    def __init__(self, settings: Settings, *, group_id: str = RUNNER_GROUP) -> None:
        self.settings = settings
        self.group_id = group_id
        self.streams: dict[str, CaptureProcess] = {}
        self._stops: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._seen_starts: OrderedDict[str, None] = OrderedDict()
        self._producer: AIOKafkaProducer | None = None

    async def run(self) -> None:
        """Serve until cancelled; on the way out every capture process is stopped and reported."""
        settings = self.settings
        await ensure_topics(settings, [settings.topic_commands, settings.topic_frames, settings.topic_states])
        self._producer = create_producer(settings, client_id="lookout-runner")
        await self._producer.start()
        consumer = create_consumer(
            settings, settings.topic_commands, group_id=self.group_id, client_id="lookout-runner"
        )
        lag = ConsumerLagReporter(consumer, self.group_id)
        try:
            await consumer.start()
            log.info(
                "runner consuming commands", extra={"topic": settings.topic_commands, "group": self.group_id}
            )
            while True:
                # a broker restarting: the consumer reconnects by itself
                async for attempt in retrying(settings, "commands fetch", retry=KAFKA_DOWN):
                    with attempt:
                        batch = await consumer.getmany(timeout_ms=1000)
                for records in batch.values():
                    for record in records:
                        await self._handle(record)
                await self._finish_stops()
                if batch:
                    try:
                        await consumer.commit()
                    except KafkaError as err:
                        # the commands come again after a rebalance: starts are deduped, stops idempotent
                        log.warning("commands offset commit failed", extra={"error": repr(err)})
                await lag.update()
        finally:
            await self._shutdown()
            with contextlib.suppress(KafkaError, OSError):
                await consumer.stop()
            with contextlib.suppress(KafkaError, OSError):
                await self._producer.stop()

    # --- commands ---------------------------------------------------------------------------------

    async def _handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            command = parse_command(record.value or b"")
        except ValidationError as exc:
            # The raw value may carry a URL with credentials: log where it was, never what it says.
            BAD_MESSAGES.labels("runner", record.topic).inc()
            log.warning(
                "malformed command skipped",
                extra={"partition": record.partition, "offset": record.offset, "errors": exc.error_count()},
            )
            return
        if isinstance(command, StartCommand):
            await self._start(command)
        else:
            self._begin_stop(command)

    async def _start(self, command: StartCommand) -> None:
        stream_id = command.stream_id
        if command.command_id in self._seen_starts:
            log.info(
                "duplicate start ignored", extra={"stream_id": stream_id, "command_id": command.command_id}
            )
            return
        self._remember(command.command_id)
        pending_stop = self._stops.get(stream_id)
        if pending_stop is not None:  # stop then start of the same stream: the stop finishes first
            await asyncio.shield(pending_stop)
        if stream_id in self.streams:
            log.info("stream already running; start ignored", extra={"stream_id": stream_id})
            return
        spec = CaptureSpec(
            stream_id=stream_id,
            url=command.url,
            fps=command.options.fps or self.settings.runner_default_fps,
            settings=self.settings,
        )
        process = CaptureProcess(spec, on_started=self._on_started, on_failed=self._on_failed)
        self.streams[stream_id] = process
        log.info(
            "starting stream",
            extra={"stream_id": stream_id, "url": redact_url(command.url), "fps": spec.fps},
        )
        try:
            await process.start()
        except Exception as exc:
            log.exception("capture process did not start", extra={"stream_id": stream_id})
            self.streams.pop(stream_id, None)
            forget_stream(stream_id)
            await self._publish(
                stream_id, EventKind.ERROR, error=f"could not start the capture process: {exc!r}"
            )

    def _begin_stop(self, command: StopCommand) -> None:
        stream_id = command.stream_id
        previous = self._stops.get(stream_id)
        task = asyncio.create_task(self._stop(command, after=previous), name=f"stop {stream_id}")
        self._stops[stream_id] = task
        task.add_done_callback(lambda done: self._forget_stop(stream_id, done))

    async def _stop(self, command: StopCommand, *, after: asyncio.Task[None] | None) -> None:
        stream_id = command.stream_id
        if after is not None:
            await asyncio.shield(after)
        process = self.streams.pop(stream_id, None)
        if process is None:
            outcome = StopOutcome()
            log.info("stop for a stream not running here; acknowledged", extra={"stream_id": stream_id})
        else:
            outcome = await process.stop()
            forget_stream(stream_id)
            log.info("stream stopped", extra={"stream_id": stream_id, "error": outcome.error})
        await self._publish(stream_id, EventKind.ACK, error=outcome.error)

    def _forget_stop(self, stream_id: str, task: asyncio.Task[None]) -> None:
        if self._stops.get(stream_id) is task:
            del self._stops[stream_id]

    async def _finish_stops(self) -> None:
        # Stops run concurrently, but a batch's offsets are committed only once they are acknowledged.
        if self._stops:
            await asyncio.gather(*self._stops.values(), return_exceptions=True)

    def _remember(self, command_id: str) -> None:
        self._seen_starts[command_id] = None
        while len(self._seen_starts) > SEEN_COMMANDS:
            self._seen_starts.popitem(last=False)

    # --- reports from capture processes -----------------------------------------------------------

    def _on_started(self, process: CaptureProcess) -> None:
        self._in_background(
            self._publish(process.stream_id, EventKind.PROGRESS, state=StreamState.RUNNER_STARTED)
        )

    def _on_failed(self, process: CaptureProcess, reason: str) -> None:
        if self.streams.get(process.stream_id) is process:
            del self.streams[process.stream_id]
            forget_stream(process.stream_id)
        self._in_background(self._publish(process.stream_id, EventKind.ERROR, error=reason))

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _publish(
        self, stream_id: str, kind: EventKind, *, state: StreamState | None = None, error: str | None = None
    ) -> None:
        event = StateEvent(stream_id=stream_id, service=Service.RUNNER, kind=kind, state=state, error=error)
        assert self._producer is not None
        try:
            await self._producer.send_and_wait(
                self.settings.topic_states, value=event.model_dump_json().encode(), key=stream_id.encode()
            )
        except KafkaError:
            log.exception("state event not published", extra={"stream_id": stream_id, "kind": kind})
            return
        log.info(
            "state event published",
            extra={
                "stream_id": stream_id,
                "event_id": event.event_id,
                "kind": kind,
                "state": state,
                "error": error,
            },
        )

    # --- shutdown ---------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Stop every capture process; a stream cut off by the runner's own exit is reported as an error."""
        running = list(self.streams.values())
        self.streams.clear()
        await asyncio.gather(*(p.stop() for p in running), *self._stops.values(), return_exceptions=True)
        for process in running:
            forget_stream(process.stream_id)
            await self._publish(
                process.stream_id, EventKind.ERROR, error="runner shut down while the stream was running"
            )
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run the runner until ``stop`` is set; on the way out its capture processes are stopped."""
    service = asyncio.create_task(RunnerService(settings).run(), name="runner")
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([service, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    service.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await service


def main() -> None:
    """Console script ``lookout-runner``."""
    run_service("runner", serve, metrics_port=lambda s: s.metrics_port_runner)


if __name__ == "__main__":
    main()
