"""Live views: a running stream's annotated frames as they are made, as MJPEG, only while watched.

    browser ──POST /streams/{id}/live (read key)──▶ a ticket signed for the stream, short-lived
    <img src="/streams/{id}/live.mjpeg?ticket=…"> ──▶ a ``Viewer`` of this instance's ``LiveHub``

While a ``LiveHub`` has viewers it sends a ``WatchCommand`` for each watched stream every
``live_watch_every_s`` (on the commands topic: the ML instance running the stream reads it), and
reads the live topic with one Kafka consumer (no group, every partition from its end). The
stream's detection process encodes its annotated frames only while the last watch has not run out
(``live_watch_for_s``): once nobody watches, the encoding stops within that time and the reader
``LINGER_S`` later. Each viewer holds the newest ``live_viewer_queue`` frames; a viewer that does
not keep up (a stalled socket) loses its oldest ones
(``lookout_live_frames_dropped_total{where="viewer"}``), and nobody else waits for it: neither the
other viewers, nor the consumer, nor detection. A viewer whose socket takes nothing for
``live_stall_s`` is disconnected (api/routes/live.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from core.kafka import close_client, create_producer
from core.messages import WatchCommand
from core.metrics import LIVE_FRAMES_DROPPED, LIVE_VIEWERS
from core.sealing import purpose_keys
from core.settings import Settings
from core.timeouts import within

log = logging.getLogger(__name__)

LINGER_S = 10.0  # the hub keeps its Kafka clients this long after its last viewer left
RETRY_S = 2.0  # after the broker failed the hub


class TicketRefused(Exception):
    """The ticket is malformed, altered, for another stream, or expired (the message says which)."""


TICKET = re.compile(r"([0-9a-f]{32})\.([0-9]{1,12})\.([A-Za-z0-9_-]{43})")


class LiveTickets:
    """Signs and checks the tickets that open a stream's live view (an ``<img>`` sends no header).

    A ticket is ``<key id>.<expiry>.<signature>``: HMAC-SHA256 of the stream id, the API key that
    asked for it and the expiry, keyed from ``LOOKOUT_SECRET_KEY`` (the previous keys still check), so
    every API instance of a deployment accepts every other's, and a view ends when its key is revoked."""

    def __init__(self, settings: Settings) -> None:
        self._keys = purpose_keys(settings, "live ticket")
        self._ttl_s = settings.live_ticket_ttl_s

    def issue(self, stream_id: str, key_id: uuid.UUID, now: float | None = None) -> tuple[str, float]:
        """A ticket for ``stream_id`` on behalf of API key ``key_id``, and when it expires (epoch seconds)."""
        expires = int((time.time() if now is None else now) + self._ttl_s)
        signature = self._signature(self._keys[0], stream_id, key_id.hex, expires)
        return f"{key_id.hex}.{expires}.{signature}", float(expires)

    def check(self, stream_id: str, ticket: str, now: float | None = None) -> uuid.UUID:
        """The id of the API key the ticket was issued to; raises ``TicketRefused`` unless it opens
        ``stream_id`` now."""
        parsed = TICKET.fullmatch(ticket)
        if parsed is None:
            raise TicketRefused("malformed live ticket: ask POST /streams/{id}/live for one")
        key_hex, expires_text, signature = parsed.groups()
        expires = int(expires_text)
        if not any(
            hmac.compare_digest(
                signature.encode(), self._signature(key, stream_id, key_hex, expires).encode()
            )
            for key in self._keys
        ):
            raise TicketRefused("this live ticket is not for this stream, or was altered")
        if expires < (time.time() if now is None else now):
            raise TicketRefused("live ticket expired: ask POST /streams/{id}/live for another")
        return uuid.UUID(key_hex)

    @staticmethod
    def _signature(key: bytes, stream_id: str, key_hex: str, expires: int) -> str:
        digest = hmac.new(key, f"{stream_id}.{key_hex}.{expires}".encode(), hashlib.sha256).digest()
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

    @property
    def full(self) -> bool:
        """This instance serves ``live_max_viewers`` views already."""
        return self.viewer_count >= self.settings.live_max_viewers

    @asynccontextmanager
    async def watching(self, stream_id: str) -> AsyncIterator[Viewer]:
        """A viewer of ``stream_id`` for the block; raises ``TooManyViewers`` at the instance's limit."""
        if self.full:
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
            sent = [
                await producer.send(
                    s.topic_commands,
                    WatchCommand(stream_id=stream_id, for_s=s.live_watch_for_s).model_dump_json().encode(),
                    key=stream_id.encode(),
                )
                for stream_id in list(self.viewers)
            ]
            await asyncio.gather(*sent)  # every stream's watch in flight at once
            with suppress(TimeoutError):
                await within(self._new_stream.wait(), s.live_watch_every_s)
