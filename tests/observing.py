"""Watching what the services do, for assertions: records on a topic, metric samples, conditions
that become true."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import httpx
from aiokafka import ConsumerRecord
from prometheus_client import REGISTRY

from core.kafka import create_consumer
from core.settings import Settings


async def consume(
    settings: Settings,
    topic: str,
    *,
    until: Callable[[list[ConsumerRecord[bytes, bytes]]], bool],
    timeout_s: float = 30.0,
    linger_s: float = 0.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Records of ``topic`` from the start, read until ``until(records)`` holds, then ``linger_s`` more."""
    consumer = create_consumer(settings, topic, group_id=f"test-reader-{uuid.uuid4().hex[:8]}")
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        deadline = time.monotonic() + timeout_s
        while not until(records):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{topic}: condition not met after {timeout_s}s with {len(records)} records"
                )
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
        linger_end = time.monotonic() + linger_s
        while time.monotonic() < linger_end:
            for batch in (await consumer.getmany(timeout_ms=100)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def eventually(
    check: Callable[[], object],
    timeout_s: float = 20.0,
    interval_s: float = 0.1,
    what: Callable[[], object] | None = None,
) -> None:
    """Wait until ``check()`` (sync or async) returns a truthy value; ``what()`` says what was seen
    when it never does."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            seen = f": {what()}" if what is not None else ""
            raise AssertionError(f"condition not met after {timeout_s}s{seen}")
        await asyncio.sleep(interval_s)


def sample(name: str, **labels: str) -> float:
    """The value of a sample in this process's Prometheus registry; 0 when it has none yet."""
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


MJPEG_BOUNDARY = b"--lookout-frame\r\n"


async def read_mjpeg(client: httpx.AsyncClient, url: str, into: list[bytes], stop: asyncio.Event) -> None:
    """The JPEGs of an MJPEG response, as a browser's ``<img>`` reads them, until ``stop``."""
    async with client.stream("GET", url) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"] == "multipart/x-mixed-replace; boundary=lookout-frame"
        buffer = b""
        async for chunk in response.aiter_raw():
            buffer += chunk
            while True:
                start = buffer.find(MJPEG_BOUNDARY)
                head_end = buffer.find(b"\r\n\r\n", start)
                if start < 0 or head_end < 0:
                    break
                length = int(buffer[start:head_end].split(b"Content-Length: ")[1])
                if len(buffer) < head_end + 4 + length:
                    break
                into.append(buffer[head_end + 4 : head_end + 4 + length])
                buffer = buffer[head_end + 4 + length :]
            if stop.is_set():
                return
