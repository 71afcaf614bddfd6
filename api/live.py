"""Live views: a running stream's annotated frames as they are made, as MJPEG, only while watched.

    browser ──POST /streams/{id}/live (read key)──▶ a ticket signed for the stream, short-lived
    <img src="/streams/{id}/live.mjpeg?ticket=…"> ──▶ a ``Viewer`` of this instance's ``LiveHub``

While a ``LiveHub`` has viewers it sends a ``WatchCommand`` for each watched stream every
``live_watch_every_s`` (on the commands topic: the ML instance running the stream reads it), and
reads the live topic with one Kafka consumer (no group, every partition from its end). The
stream's detection process encodes its annotated frames only while the last watch has not run out
(``live_watch_for_s``): nobody watching costs nothing but this module's idle object. Each viewer
holds the newest ``live_viewer_queue`` frames; a viewer that does not keep up (a stalled socket)
loses its oldest ones (``lookout_live_frames_dropped_total{where="viewer"}``), and nobody else
waits for it: neither the other viewers, nor the consumer, nor detection.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from core.kafka import close_client, create_producer
from core.messages import WatchCommand
from core.metrics import LIVE_FRAMES_DROPPED, LIVE_VIEWERS
from core.sealing import purpose_key
from core.settings import Settings
from core.timeouts import within

log = logging.getLogger(__name__)

LINGER_S = 10.0  # the hub keeps its Kafka clients this long after its last viewer left
RETRY_S = 2.0  # after the broker failed the hub


class TicketRefused(Exception):
    """The ticket is malformed, altered, for another stream, or expired (the message says which)."""


class LiveTickets:
    """Signs and checks the tickets that open a stream's live view (an ``<img>`` sends no header).

    A ticket is ``<expiry>.<signature>``: HMAC-SHA256 of the stream id and the expiry, keyed from
    ``LOOKOUT_SECRET_KEY``, so every API instance of a deployment accepts every other's."""

    def __init__(self, settings: Settings) -> None:
        self._key = purpose_key(settings, "live ticket")
        self._ttl_s = settings.live_ticket_ttl_s

    def issue(self, stream_id: str, now: float | None = None) -> tuple[str, float]:
        """A ticket for ``stream_id`` and when it expires (seconds since the epoch)."""
        expires = int((time.time() if now is None else now) + self._ttl_s)
        return f"{expires}.{self._signature(stream_id, expires)}", float(expires)

    def check(self, stream_id: str, ticket: str, now: float | None = None) -> None:
        """Raises ``TicketRefused`` unless ``ticket`` opens ``stream_id`` now."""
        expires_text, _, signature = ticket.partition(".")
        if not expires_text.isdigit() or not signature:
            raise TicketRefused("malformed live ticket: ask POST /streams/{id}/live for one")
        expires = int(expires_text)
        if not hmac.compare_digest(signature, self._signature(stream_id, expires)):
            raise TicketRefused("this live ticket is not for this stream, or was altered")
        if expires < (time.time() if now is None else now):
            raise TicketRefused("live ticket expired: ask POST /streams/{id}/live for another")

    def _signature(self, stream_id: str, expires: int) -> str:
        digest = hmac.new(self._key, f"{stream_id}.{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")


class Viewer:
    """One open live view: the newest frames of its stream, oldest dropped when it falls behind."""

    def __init__(self, stream_id: str, queue_size: int) -> None:
        self.stream_id = stream_id
        self.frames: asyncio.Queue[bytes] = asyncio.Queue(queue_size)
        self.dropped = 0

    def offer(self, jpeg: bytes) -> None:
        if self.frames.full():
            self.frames.get_nowait()
            self.dropped += 1
            LIVE_FRAMES_DROPPED.labels("viewer").inc()
        self.frames.put_nowait(jpeg)


class TooManyViewers(Exception):
    """This API instance already serves ``live_max_viewers`` live views."""


class LiveHub:
    """This API instance's live views: whom it serves, the watch commands and the live topic's reader."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.viewers: dict[str, set[Viewer]] = {}
        self._task: asyncio.Task[None] | None = None
        self._new_stream = asyncio.Event()  # a stream got its first viewer: tell ML at once

    @property
    def viewer_count(self) -> int:
        return sum(len(v) for v in self.viewers.values())

    @asynccontextmanager
    async def watching(self, stream_id: str) -> AsyncIterator[Viewer]:
        """A viewer of ``stream_id`` for the block; raises ``TooManyViewers`` at the instance's limit."""
        if self.viewer_count >= self.settings.live_max_viewers:
            raise TooManyViewers(
                f"this API instance serves {self.settings.live_max_viewers} live views already"
            )
        viewer = Viewer(stream_id, self.settings.live_viewer_queue)
        watchers = self.viewers.setdefault(stream_id, set())
        if not watchers:
            self._new_stream.set()
        watchers.add(viewer)
        LIVE_VIEWERS.inc()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._serve(), name="live-hub")
        try:
            yield viewer
        finally:
            watchers.discard(viewer)
            if not watchers and self.viewers.get(stream_id) is watchers:
                del self.viewers[stream_id]
            LIVE_VIEWERS.dec()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    async def _serve(self) -> None:
        """Watch commands and the live topic's frames while anyone watches (and ``LINGER_S`` after)."""
        while self.viewers:
            try:
                await self._connected()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the broker: the views show their last frame until it is back
                log.warning("live views: kafka unavailable", extra={"error": repr(err)})
                await asyncio.sleep(RETRY_S)

    async def _connected(self) -> None:
        s = self.settings
        producer = create_producer(s, client_id="lookout-api-live", idempotent=False)
        consumer = AIOKafkaConsumer(
            s.topic_live,
            bootstrap_servers=s.kafka_bootstrap,
            client_id="lookout-api-live",
            group_id=None,  # every instance reads every partition: it serves its own viewers
            auto_offset_reset="latest",
            enable_auto_commit=False,
            fetch_max_wait_ms=s.kafka_fetch_max_wait_ms,
            max_partition_fetch_bytes=s.kafka_max_request_size,
        )
        watches = None
        try:
            await producer.start()
            watches = asyncio.create_task(self._send_watches(producer), name="live-watches")
            await consumer.start()
            idle_since: float | None = None
            while idle_since is None or time.monotonic() - idle_since < LINGER_S:
                if watches.done():
                    await watches  # its failure is the hub's
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        for viewer in list(self.viewers.get((record.key or b"").decode(), ())):
                            viewer.offer(record.value or b"")
                idle_since = None if self.viewers else (idle_since or time.monotonic())
        finally:
            if watches is not None:
                watches.cancel()
                with suppress(asyncio.CancelledError, Exception):
                    await watches
            await close_client(consumer, "live consumer")
            await close_client(producer, "live producer")

    async def _send_watches(self, producer: AIOKafkaProducer) -> None:
        s = self.settings
        while True:
            self._new_stream.clear()
            for stream_id in list(self.viewers):
                command = WatchCommand(stream_id=stream_id, for_s=s.live_watch_for_s)
                await producer.send_and_wait(
                    s.topic_commands, command.model_dump_json().encode(), key=stream_id.encode()
                )
            with suppress(TimeoutError):
                await within(self._new_stream.wait(), s.live_watch_every_s)
