"""DetectionStore on the real S3 gateway and Postgres: idempotent rows, retries through an outage."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from pydantic import SecretStr

from core.analytics import AnalyticsEvent, AnalyticsKind, Direction, event_id
from core.detections import Box, DetectedObject
from core.messages import FrameHeaders, StreamOptions
from core.settings import Settings
from core.storage import create_s3_client
from core.timeouts import within
from deploy.servers import free_port
from tests.workers.ml.conftest import insert_stream
from workers.ml.store import DetectionStore, FrameAnalytics, PermanentStoreError, frame_key

pytestmark = pytest.mark.integration

PERSON = DetectedObject(class_name="person", class_id=0, confidence=0.9, box=Box(x1=1, y1=2, x2=30, y2=40))


STARTED = time.time()


def headers(stream_id: str, seq: int) -> FrameHeaders:
    """A frame's headers: the same frame (a redelivery) has the same capture time."""
    return FrameHeaders(stream_id=stream_id, frame_seq=seq, capture_ts=STARTED + seq / 5, width=64, height=48)


class TcpProxy:
    """Forwards a local port to Postgres; ``down()`` cuts every connection and refuses new ones."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def down(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, upstream_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        self._writers -= {writer, upstream_writer}


def via_proxy(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit((parts.scheme, f"{netloc[0]}@{host}" if len(netloc) == 2 else host, *parts[2:]))


async def test_same_frame_saved_twice_makes_one_row_and_one_object(
    settings: Settings, db_pool: asyncpg.Pool
) -> None:
    stream_id = await insert_stream(db_pool)
    store = DetectionStore(settings)
    try:
        assert await asyncio.to_thread(store.save, headers(stream_id, 1), b"\xff\xd8jpeg", [PERSON]) is True
        assert await asyncio.to_thread(store.save, headers(stream_id, 1), b"\xff\xd8jpeg", [PERSON]) is False
    finally:
        store.close()
    rows = await db_pool.fetch("SELECT * FROM detections WHERE stream_id = $1", uuid.UUID(stream_id))
    assert len(rows) == 1
    assert rows[0]["objects"] == [
        {"class": "person", "class_id": 0, "confidence": 0.9, "box": {"x1": 1, "y1": 2, "x2": 30, "y2": 40}}
    ]
    assert rows[0]["s3_key"] == frame_key(stream_id, 1)
    s3 = create_s3_client(settings)
    body = await asyncio.to_thread(
        lambda: s3.get_object(settings.s3_bucket_frames, frame_key(stream_id, 1)).read()
    )
    assert body == b"\xff\xd8jpeg"


async def test_a_redelivered_frame_stores_no_second_event_outbox_message_delivery_or_count(
    settings: Settings, db_pool: asyncpg.Pool
) -> None:
    stream_id = await insert_stream(db_pool, StreamOptions(webhook_url="http://127.0.0.1:9/hook"))
    frame = headers(stream_id, 7)
    crossed = AnalyticsEvent(
        event_id=event_id(stream_id, 7, AnalyticsKind.CROSSED, "door", 3),
        stream_id=stream_id,
        kind=AnalyticsKind.CROSSED,
        zone="door",
        direction=Direction.IN,
        track_id=3,
        class_name="person",
        confidence=0.9,
        frame_seq=7,
        occurred_at=datetime.fromtimestamp(frame.capture_ts, UTC),
        s3_key=frame_key(stream_id, 7),
    )
    entered = crossed.model_copy(
        update={"event_id": event_id(stream_id, 7, AnalyticsKind.ENTERED, "bay", 3), "kind": AnalyticsKind.ENTERED,
                "zone": "bay", "direction": None}
    )  # fmt: skip
    analytics = FrameAnalytics(stream_id, [crossed, entered], {"bay": 1})
    tracked = PERSON.model_copy(update={"track_id": 3})
    store = DetectionStore(settings)
    try:
        assert await asyncio.to_thread(store.save, frame, b"\xff\xd8jpeg", [tracked], analytics) is True
        # delivered again (a restarted ML, a rebalance): the row exists, so nothing else is written
        assert await asyncio.to_thread(store.save, frame, b"\xff\xd8jpeg", [tracked], analytics) is False
    finally:
        store.close()
    sid = uuid.UUID(stream_id)
    events = await db_pool.fetch(
        "SELECT event_id, kind, zone, direction FROM events WHERE stream_id = $1", sid
    )
    assert sorted((e["kind"], e["zone"], e["direction"]) for e in events) == [
        ("crossed", "door", "in"),
        ("entered", "bay", None),
    ]
    messages = await db_pool.fetch(
        "SELECT payload FROM outbox WHERE topic = $1 AND key = $2", settings.topic_events, stream_id
    )
    assert sorted(AnalyticsEvent.model_validate_json(m["payload"]).event_id for m in messages) == sorted(
        e["event_id"] for e in events
    )
    assert await db_pool.fetchval("SELECT count(*) FROM webhook_deliveries WHERE stream_id = $1", sid) == 2
    figures = await db_pool.fetch(
        "SELECT name, shape, occupancy, count_in, count_out FROM stream_analytics WHERE stream_id = $1 ORDER BY name",
        sid,
    )
    assert [tuple(f) for f in figures] == [("bay", "zone", 1, 1, 0), ("door", "line", 0, 1, 0)]
    row = await db_pool.fetchrow("SELECT objects FROM detections WHERE stream_id = $1", sid)
    assert row["objects"][0]["track_id"] == 3


async def test_frame_of_a_stream_without_a_row_is_refused_for_good(settings: Settings) -> None:
    store = DetectionStore(settings)
    try:
        with pytest.raises(PermanentStoreError, match="no row in streams"):
            await asyncio.to_thread(store.save, headers(str(uuid.uuid4()), 1), b"\xff\xd8", [PERSON])
    finally:
        store.close()


async def test_postgres_down_for_a_few_seconds_delays_the_frame_in_hand_without_losing_it(
    settings: Settings, db_pool: asyncpg.Pool
) -> None:
    stream_id = await insert_stream(db_pool)
    url = settings.database_url.get_secret_value()
    target = urlsplit(url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await proxy.up()
    proxied = settings.model_copy(update={"database_url": SecretStr(via_proxy(url, proxy.port))})
    store = DetectionStore(proxied, retry_first_s=0.1, retry_max_s=0.5)
    try:
        assert await asyncio.to_thread(store.save, headers(stream_id, 1), b"\xff\xd8", [PERSON])
        await proxy.down()
        in_hand = asyncio.create_task(
            asyncio.to_thread(store.save, headers(stream_id, 2), b"\xff\xd8", [PERSON])
        )
        await asyncio.sleep(2.5)
        assert not in_hand.done(), "the frame waits for Postgres instead of being dropped"
        await proxy.up()
        assert await within(in_hand, 20) is True
    finally:
        store.close()
        await proxy.down()
    seqs = await db_pool.fetch(
        "SELECT frame_seq FROM detections WHERE stream_id = $1 ORDER BY frame_seq", uuid.UUID(stream_id)
    )
    assert [r["frame_seq"] for r in seqs] == [1, 2]
