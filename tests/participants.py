"""Stand-ins for the runner and ML in lifecycle tests: they answer commands on the states topic.

Like the real services they consume the commands topic in a group of their own and publish
``StateEvent`` s keyed by stream id: on ``start`` the runner reports ``runner_started`` and ML
``ml_started``; on ``stop`` each acknowledges, even for a stream it never ran. A test picks a
behaviour through the stream URL: a path segment ``silent-runner`` or ``silent-ml`` keeps that
service silent on stop, ``error-runner`` or ``error-ml`` makes it report an error instead of
starting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from core.kafka import create_consumer, create_producer
from core.messages import (
    EventKind,
    Service,
    StartCommand,
    StateEvent,
    StopCommand,
    WatchCommand,
    parse_command,
)
from core.sealing import UrlSealer
from core.settings import Settings
from core.states import StreamState
from core.timeouts import within

log = logging.getLogger(__name__)

STARTED_STATE = {Service.RUNNER: StreamState.RUNNER_STARTED, Service.ML: StreamState.ML_STARTED}


@dataclass
class ScriptedParticipant:
    """Plays ``service``: progress on start, an acknowledgement on stop, unless the URL says otherwise."""

    settings: Settings
    service: Service
    start_delay_s: float = 0.0  # ML reports after the runner, as it waits for a first frame
    handled: list[StartCommand | StopCommand] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # started, with its partitions assigned
    _urls: dict[str, str] = field(default_factory=dict)
    _seen: set[str] = field(default_factory=set)

    async def run(self, stop: asyncio.Event) -> None:
        group = f"test-{self.service.value}-{uuid.uuid4().hex[:8]}"
        consumer = create_consumer(self.settings, self.settings.topic_commands, group_id=group)
        producer = create_producer(self.settings, client_id=f"test-{self.service.value}")
        await producer.start()
        await consumer.start()
        try:
            while not stop.is_set():
                try:
                    batch = await consumer.getmany(timeout_ms=200)
                    if consumer.assignment():
                        self.ready.set()
                    for records in batch.values():
                        for record in records:
                            await self._answer(producer, record.value)
                    if batch:
                        await consumer.commit()
                except KafkaError as err:  # broker restarts and rebalances: commands come again
                    log.warning("participant kafka error", extra={"error": repr(err)})
                    await asyncio.sleep(0.5)
        finally:
            await consumer.stop()
            await producer.stop()

    def _behaves(self, stream_id: str, behaviour: str) -> bool:
        return f"/{behaviour}-{self.service.value}" in self._urls.get(stream_id, "")

    async def _answer(self, producer: AIOKafkaProducer, value: bytes | None) -> None:
        try:
            command = parse_command(value or b"")
        except ValidationError:
            log.warning("participant skipped a malformed command")
            return
        if isinstance(command, WatchCommand):  # a live view: nothing a lifecycle participant does
            return
        if command.command_id in self._seen:
            return
        self._seen.add(command.command_id)
        self.handled.append(command)
        stream_id = command.stream_id
        if isinstance(command, StartCommand):
            self._urls[stream_id] = UrlSealer(self.settings).open(command.url_sealed)
            await asyncio.sleep(self.start_delay_s)
            if self._behaves(stream_id, "error"):
                event = self._event(stream_id, EventKind.ERROR, error=f"{self.service.value} could not start")
            else:
                event = self._event(stream_id, EventKind.PROGRESS, state=STARTED_STATE[self.service])
        elif self._behaves(stream_id, "silent"):
            return
        else:
            event = self._event(stream_id, EventKind.ACK)
        await producer.send_and_wait(
            self.settings.topic_states, event.model_dump_json().encode(), key=stream_id.encode()
        )

    def _event(
        self, stream_id: str, kind: EventKind, *, state: StreamState | None = None, error: str | None = None
    ) -> StateEvent:
        return StateEvent(stream_id=stream_id, service=self.service, kind=kind, state=state, error=error)


@dataclass
class Participants:
    runner: ScriptedParticipant
    ml: ScriptedParticipant


@contextlib.asynccontextmanager
async def running_participants(settings: Settings) -> AsyncIterator[Participants]:
    """A scripted runner and a scripted ML, each in a consumer group of its own."""
    participants = Participants(
        runner=ScriptedParticipant(settings, Service.RUNNER),
        ml=ScriptedParticipant(settings, Service.ML, start_delay_s=0.3),
    )
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(participants.runner.run(stop), name="scripted-runner"),
        asyncio.create_task(participants.ml.run(stop), name="scripted-ml"),
    ]
    try:
        # a test that stops the broker at once must not catch a participant still joining its group
        ready = asyncio.gather(participants.runner.ready.wait(), participants.ml.ready.wait())
        try:
            await within(asyncio.wait({ready, *tasks}, return_when=asyncio.FIRST_COMPLETED), 60)
        finally:
            ready.cancel()
        for task in tasks:
            if task.done():
                task.result()  # a participant that failed to start fails the test here
        yield participants
    finally:
        stop.set()
        await within(asyncio.gather(*tasks), 30)
