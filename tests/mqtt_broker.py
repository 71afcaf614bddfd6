"""A real Mosquitto for tests (the stack's recipe) that can be killed -9 and started again on the same
port and data, and a real MQTT client that records everything it receives, across reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from deploy import servers

log = logging.getLogger(__name__)

USER = "lookout"
PASSWORD = "test-mqtt-password"


@dataclass
class Broker:
    """Mosquitto on a free port with one user; ``kill`` is a kill -9, ``start`` brings it back."""

    data_dir: Path
    port: int = field(default_factory=servers.free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        spec = servers.mosquitto_server(self.data_dir, self.port, USER, PASSWORD)
        self.proc = spec.start(timeout=30, die_with_parent=True)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            servers.stop_process_group(self.proc.pid)
            self.proc = None


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    at: float

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Subscriber:
    """A persistent-session client (QoS 1) subscribed to ``topics``, reconnecting while the broker is
    away; ``messages`` is everything it received, in order."""

    port: int
    topics: tuple[str, ...] = ("#",)
    identifier: str = "test-subscriber"
    messages: list[Received] = field(default_factory=list)
    connects: int = 0

    def latest(self, topic: str) -> bytes | None:
        for message in reversed(self.messages):
            if message.topic == topic:
                return message.payload
        return None

    def on(self, prefix: str) -> list[Received]:
        return [m for m in self.messages if m.topic.startswith(prefix)]

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.port, username=USER, password=PASSWORD, identifier=self.identifier,
                    clean_session=False, keepalive=5, timeout=5,
                ) as client:  # fmt: skip
                    self.connects += 1
                    for topic in self.topics:
                        await client.subscribe(topic, qos=1)
                    async for message in client.messages:
                        payload = (
                            message.payload
                            if isinstance(message.payload, bytes)
                            else str(message.payload).encode()
                        )
                        self.messages.append(
                            Received(str(message.topic), payload, message.retain, time.monotonic())
                        )
                        if stop.is_set():
                            return
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def subscribed(
    port: int, *topics: str, identifier: str = "test-subscriber"
) -> AsyncIterator[Subscriber]:
    """A running ``Subscriber``, connected (and subscribed) before the body runs."""
    subscriber = Subscriber(port, topics or ("#",), identifier)
    stop = asyncio.Event()
    task = asyncio.create_task(subscriber.run(stop), name="mqtt-subscriber")
    deadline = time.monotonic() + 15
    while subscriber.connects == 0:
        assert time.monotonic() < deadline, "the test's MQTT client never connected"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # its subscriptions acknowledged
    try:
        yield subscriber
    finally:
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
