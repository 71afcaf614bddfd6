"""Frames made from ultralytics' sample images, stream rows, topics of their own, state-event capture."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import cast

import asyncpg
import cv2
import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from core.kafka import create_consumer, create_producer, ensure_topics
from core.messages import FrameHeaders, StateEvent, StreamOptions
from core.settings import Settings
from core.timeouts import within
from workers.ml.service import MLHandler, ml_service

# found without importing ultralytics: it must first be imported by workers.ml.detector, which sets
# YOLO_OFFLINE before ultralytics reads it
_ULTRALYTICS = importlib.util.find_spec("ultralytics")
assert _ULTRALYTICS is not None and _ULTRALYTICS.submodule_search_locations
ASSETS = Path(_ULTRALYTICS.submodule_search_locations[0]) / "assets"


def jpeg_of(name: str) -> bytes:
    """One of ultralytics' sample images (``bus.jpg``, ``zidane.jpg``) re-encoded as a frame."""
    image = cv2.imread(str(ASSETS / name))
    assert image is not None
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return bytes(buffer)


def frame_size(jpeg: bytes) -> tuple[int, int]:
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image.shape[1], image.shape[0]


@pytest.fixture(scope="session")
def bus_jpeg() -> bytes:
    return jpeg_of("bus.jpg")


@pytest.fixture(scope="session")
def zidane_jpeg() -> bytes:
    return jpeg_of("zidane.jpg")


def topics_of_their_own(settings: Settings) -> Settings:
    """A copy of ``settings`` with fresh topic names, so a service sees only this test's records."""
    suffix = uuid.uuid4().hex[:8]
    return settings.model_copy(
        update={
            "topic_commands": f"test.ml.commands.{suffix}",
            "topic_frames": f"test.ml.frames.{suffix}",
            "topic_states": f"test.ml.states.{suffix}",
            "kafka_group_prefix": f"test-{suffix}",
            "heartbeat_interval_s": 1.0,
        }
    )


async def create_topics(settings: Settings) -> None:
    await ensure_topics(
        settings, [settings.topic_commands, settings.topic_frames, settings.topic_states], partitions=2
    )


async def insert_stream(pool: asyncpg.Pool, options: StreamOptions | None = None) -> str:
    """A row in ``streams`` (detections reference it); returns the new stream id."""
    stream_id = uuid.uuid4()
    await pool.execute(
        "INSERT INTO streams (id, url_redacted, url_full, options, state) VALUES ($1, $2, $2, $3, 'runner_started')",
        stream_id,
        "rtsp://camera.test/live",
        (options or StreamOptions()).model_dump(exclude_none=True),
    )
    return str(stream_id)


class FrameSender:
    """Publishes frames and commands the way the runner and the lifecycle do."""

    def __init__(self, settings: Settings, producer: AIOKafkaProducer) -> None:
        self.settings = settings
        self.producer = producer

    async def frame(self, stream_id: str, seq: int, jpeg: bytes, *, capture_ts: float | None = None) -> None:
        width, height = frame_size(jpeg)
        headers = FrameHeaders(
            stream_id=stream_id,
            frame_seq=seq,
            capture_ts=time.time() if capture_ts is None else capture_ts,
            width=width,
            height=height,
        )
        await self.producer.send_and_wait(
            self.settings.topic_frames, jpeg, key=stream_id.encode(), headers=headers.to_kafka()
        )

    async def command(self, stream_id: str, command_json: str) -> None:
        await self.producer.send_and_wait(
            self.settings.topic_commands, command_json.encode(), key=stream_id.encode()
        )


@contextlib.asynccontextmanager
async def frame_sender(settings: Settings) -> AsyncIterator[FrameSender]:
    producer = create_producer(settings, client_id="test-ml")
    await producer.start()
    try:
        yield FrameSender(settings, producer)
    finally:
        await producer.stop()


class StateEvents:
    """Collects the state events ML publishes, for a test to wait on."""

    def __init__(self) -> None:
        self.events: list[StateEvent] = []
        self._changed = asyncio.Condition()

    async def add(self, event: StateEvent) -> None:
        async with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[StateEvent], bool], within_s: float = 30) -> StateEvent:
        async def found() -> StateEvent:
            async with self._changed:
                while True:
                    for event in self.events:
                        if predicate(event):
                            return event
                    await self._changed.wait()

        return await within(found(), within_s)

    def of(self, stream_id: str) -> list[StateEvent]:
        return [e for e in self.events if e.stream_id == stream_id]


@contextlib.asynccontextmanager
async def state_events(settings: Settings) -> AsyncIterator[StateEvents]:
    """Reads the states topic in the background (own consumer group) while the block runs."""
    collected = StateEvents()
    consumer = create_consumer(
        settings, settings.topic_states, group_id=f"test-ml-states-{uuid.uuid4().hex[:8]}"
    )
    await consumer.start()

    async def read() -> None:
        async for record in consumer:
            await collected.add(StateEvent.model_validate_json(record.value or b""))

    task = asyncio.create_task(read())
    try:
        yield collected
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await consumer.stop()


@contextlib.asynccontextmanager
async def running_ml(settings: Settings, group_id: str | None = None) -> AsyncIterator[MLHandler]:
    """The ML service in a consumer group of its own; yields its handler (streams, finished)."""
    async with ml_service(settings, group_id=group_id or f"test-ml-{uuid.uuid4().hex[:8]}") as service:
        yield cast(MLHandler, service.handler)
