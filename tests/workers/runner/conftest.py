"""Fixtures of the runner tests: the real test camera, a runner on a throw-away broker, topic readers."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import cast

import psutil
import pytest
from aiokafka import AIOKafkaConsumer

from core.kafka import create_producer, ensure_topics
from core.messages import FrameHeaders, StartCommand, StateEvent, StopCommand, StreamOptions
from core.sealing import UrlSealer
from core.settings import Settings
from tests.conftest import make_settings
from workers.runner.service import RunnerHandler, runner_service

# Short timeouts keep the failure tests fast; the test camera opens in well under a second.
OPEN_TIMEOUT_MS = 2000
READ_TIMEOUT_MS = 1500
RECONNECT_BUDGET_S = 3.0
MAX_SIDE = 640  # the clip is 768x576, so frames come out 640x480
JPEG_QUALITY = 80


def capture_processes() -> list[psutil.Process]:
    """Spawned multiprocessing children of this test process (the runner's capture processes)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any("spawn_main" in part for part in child.cmdline()):  # not the resource tracker
                found.append(child)
    return found


def runner_settings(kafka_bootstrap: str, **overrides: object) -> Settings:
    """Settings for one runner with its own topics, so tests never see each other's messages."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    base: dict[str, object] = {
        "kafka_bootstrap": kafka_bootstrap,
        "topic_commands": f"{prefix}.commands",
        "topic_frames": f"{prefix}.frames",
        "topic_states": f"{prefix}.states",
        "topic_dead_letter": f"{prefix}.dead-letter",
        "kafka_group_prefix": prefix,  # no dead member of another test in its group
        "kafka_fetch_max_wait_ms": 20,
        "runner_open_timeout_ms": OPEN_TIMEOUT_MS,
        "runner_read_timeout_ms": READ_TIMEOUT_MS,
        "runner_reconnect_budget_s": RECONNECT_BUDGET_S,
        "runner_max_side": MAX_SIDE,
        "runner_jpeg_quality": JPEG_QUALITY,
        "heartbeat_interval_s": 1.0,
    }
    return make_settings(**(base | overrides))


@dataclass
class Frame:
    headers: FrameHeaders
    jpeg: bytes
    received_at: float  # monotonic


@dataclass
class Event:
    event: StateEvent
    received_at: float  # monotonic


class TopicReader:
    """Reads a topic from the beginning without a consumer group and keeps what it saw."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self._consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=20,
            max_partition_fetch_bytes=settings.kafka_max_request_size,
        )
        self.records: list[tuple[bytes, list[tuple[str, bytes]], bytes, float]] = []

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def poll(self) -> None:
        batch = await self._consumer.getmany(timeout_ms=100)
        now = time.monotonic()
        for records in batch.values():
            for r in records:
                self.records.append((r.key or b"", list(r.headers), r.value or b"", now))


class RunnerHarness:
    """The runner service running as a task, with a command producer and readers of its output."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.service = runner_service(settings, group_id=f"runner-{uuid.uuid4().hex[:8]}")
        self.handler = cast(RunnerHandler, self.service.handler)
        self.task: asyncio.Task[None] | None = None
        self._producer = create_producer(settings, client_id="runner-test")
        self.frames = TopicReader(settings, settings.topic_frames)
        self.states = TopicReader(settings, settings.topic_states)

    async def start(self) -> None:
        s = self.settings
        await ensure_topics(s, [s.topic_commands, s.topic_frames, s.topic_states])
        await self._producer.start()
        await self.frames.start()
        await self.states.start()
        self.task = asyncio.create_task(self.service.run())

    async def stop_service(self) -> None:
        """Cancel the runner the way SIGTERM does; its readers stay open."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    async def close(self) -> None:
        await self.stop_service()
        await self._producer.stop()
        await self.frames.stop()
        await self.states.stop()

    async def send(self, command: StartCommand | StopCommand) -> float:
        """Publish a command; returns the monotonic time it was acknowledged by the broker."""
        await self._producer.send_and_wait(
            self.settings.topic_commands, command.model_dump_json().encode(), key=command.stream_id.encode()
        )
        return time.monotonic()

    async def start_stream(self, url: str, *, fps: float | None = None, stream_id: str | None = None) -> str:
        stream_id = stream_id or f"s-{uuid.uuid4().hex[:8]}"
        await self.send(
            StartCommand(stream_id=stream_id, url_sealed=self.seal(url), options=StreamOptions(fps=fps))
        )
        return stream_id

    def seal(self, url: str) -> str:
        """The URL as the API seals it (only the runner opens it)."""
        return UrlSealer(self.settings).seal(url)

    def events_of(self, stream_id: str) -> list[Event]:
        return [
            Event(StateEvent.model_validate_json(value), at)
            for key, _h, value, at in self.states.records
            if key == stream_id.encode()
        ]

    def frames_of(self, stream_id: str) -> list[Frame]:
        return [
            Frame(FrameHeaders.from_kafka(headers), value, at)
            for key, headers, value, at in self.frames.records
            if key == stream_id.encode()
        ]

    async def wait_event(self, stream_id: str, match: Callable[[StateEvent], bool], within: float) -> Event:
        """The first state event of ``stream_id`` that matches, waiting up to ``within`` seconds."""
        deadline = time.monotonic() + within
        while True:
            for item in self.events_of(stream_id):
                if match(item.event):
                    return item
            if time.monotonic() > deadline:
                seen = [(e.event.kind, e.event.state, e.event.error) for e in self.events_of(stream_id)]
                raise AssertionError(f"no matching state event for {stream_id} in {within}s; saw {seen}")
            await self.states.poll()

    async def collect_frames(
        self, stream_id: str, until: Callable[[list[Frame]], bool], within: float
    ) -> list[Frame]:
        """Frames of ``stream_id`` read so far, once ``until(frames)`` holds."""
        deadline = time.monotonic() + within
        while True:
            frames = self.frames_of(stream_id)
            if until(frames):
                return frames
            if time.monotonic() > deadline:
                raise AssertionError(f"frames of {stream_id} did not arrive in {within}s; got {len(frames)}")
            await self.frames.poll()


@pytest.fixture(scope="module")
async def runner(kafka_bootstrap: str) -> AsyncIterator[RunnerHarness]:
    """One runner for a test module; each test uses its own stream ids."""
    harness = RunnerHarness(runner_settings(kafka_bootstrap))
    await harness.start()
    yield harness
    await harness.close()
    assert capture_processes() == [], "capture processes left behind after the runner stopped"
