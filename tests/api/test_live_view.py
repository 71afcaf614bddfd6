"""Live views (api/live.py, api/routes/live.py): tickets, refusals with reasons, and on real Kafka
and real HTTP: watch commands only while someone watches, frames fanned out, a stalled viewer
dropping alone."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from urllib.parse import urlsplit

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from api.live import LiveTickets, TicketRefused, Viewer
from core.api_keys import Scope, revoke_key
from core.db import create_pool
from core.kafka import create_producer, ensure_topics
from core.messages import WatchCommand, parse_command
from core.metrics import LIVE_FRAMES_DROPPED, LIVE_VIEWERS, LIVE_VIEWERS_STALLED
from core.settings import Settings
from tests.conftest import TEST_SECRET_KEY, make_settings
from tests.e2e.pipeline import served_api
from tests.observing import consume, eventually, read_mjpeg
from tests.running_services import isolated_settings, new_api_key, running_api
from tests.stream_rows import add_streams

# --- fast: tickets and the viewer's queue --------------------------------------------------------


def test_a_ticket_opens_its_stream_only_until_it_expires_and_names_its_key() -> None:
    tickets = LiveTickets(make_settings(live_ticket_ttl_s=60))
    stream, other, key = str(uuid.uuid4()), str(uuid.uuid4()), uuid.uuid4()
    ticket, expires_at = tickets.issue(stream, key, now=1_000.0)
    assert expires_at == 1_060.0
    assert tickets.check(stream, ticket, now=1_059.0) == key
    with pytest.raises(TicketRefused, match="not for this stream"):
        tickets.check(other, ticket, now=1_001.0)
    with pytest.raises(TicketRefused, match="expired"):
        tickets.check(stream, ticket, now=1_061.0)
    key_hex, expiry, signature = ticket.split(".")
    forged = [f"{key_hex}.{int(expiry) + 3600}.{signature}", f"{uuid.uuid4().hex}.{expiry}.{signature}"]
    for altered in forged:  # a longer life, another key
        with pytest.raises(TicketRefused, match="not for this stream, or was altered"):
            tickets.check(stream, altered, now=1_001.0)
    for malformed in (
        "",
        "abc",
        f"{key_hex}.123.",
        f"{key_hex}.\u00b2.{signature}",
        f"{key_hex}.1.{'é' * 43}",
    ):
        with pytest.raises(TicketRefused, match="malformed"):
            tickets.check(stream, malformed, now=1_001.0)
    with pytest.raises(TicketRefused):  # another deployment's key
        LiveTickets(make_settings(secret_key="x" * 43 + "=")).check(stream, ticket, now=1_001.0)
    # after a rotation the previous key still checks what it signed
    rotated = LiveTickets(make_settings(secret_key="y" * 43 + "=", secret_keys_previous=TEST_SECRET_KEY))
    assert rotated.check(stream, ticket, now=1_001.0) == key


def test_a_viewer_that_falls_behind_keeps_the_newest_frames_and_counts_the_others() -> None:
    before = LIVE_FRAMES_DROPPED.labels("viewer")._value.get()
    viewer = Viewer("s", queue_size=2)
    for n in range(5):
        viewer.offer(bytes([n]))
    assert viewer.dropped == 3
    assert LIVE_FRAMES_DROPPED.labels("viewer")._value.get() - before == 3
    assert [viewer.frames.get_nowait(), viewer.frames.get_nowait()] == [b"\x03", b"\x04"]


# --- the routes' refusals (Postgres) -------------------------------------------------------------


@pytest.mark.integration
async def test_live_routes_refuse_with_reasons(settings: Settings) -> None:
    running, ended = (await add_streams(settings, count=2, running=1))[::-1]
    async with running_api(settings, scope=None) as anonymous:
        answer = await anonymous.post(f"/streams/{running}/live")
        assert answer.status_code == 401
    async with running_api(settings, scope=Scope.READ) as api:
        answer = await api.post(f"/streams/{uuid.uuid4()}/live")
        assert answer.status_code == 404 and "not found" in answer.json()["detail"]
        answer = await api.post(f"/streams/{ended}/live")
        assert answer.status_code == 409 and "nothing to watch" in answer.json()["detail"]
        ticket = (await api.post(f"/streams/{running}/live")).json()  # a read key may watch
        assert ticket["url"].startswith(f"/streams/{running}/live.mjpeg?ticket=")
        assert ticket["expires_in_s"] == settings.live_ticket_ttl_s
        query = urlsplit(ticket["url"]).query
        for path, reason in [
            (f"/streams/{running}/live.mjpeg?ticket=nope", "malformed"),
            (f"/streams/{running}/live.mjpeg?ticket=%C2%B2.x", "malformed"),
            (f"/streams/{ended}/live.mjpeg?{query}", "not for this stream"),
            (f"/streams/{running}/live.mjpeg", None),  # no ticket: FastAPI's 422 names the field
        ]:
            answer = await api.get(path)
            if reason is None:
                assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["query", "ticket"]
            else:
                assert answer.status_code == 401 and reason in answer.json()["detail"], answer.text
        # the key that asked for the ticket is revoked: the ticket opens nothing any more
        key_id = uuid.UUID(query.removeprefix("ticket=").split(".")[0])
        pool = await create_pool(settings)
        try:
            await revoke_key(pool, key_id)
        finally:
            await pool.close()
        answer = await api.get(f"/streams/{running}/live.mjpeg?{query}")
        assert answer.status_code == 401 and "revoked" in answer.json()["detail"]


# --- real Kafka, real HTTP -----------------------------------------------------------------------


class StalledViewer:
    """An MJPEG client that sends its request and then reads nothing: its socket fills up."""

    def __init__(self, base_url: str, path: str) -> None:
        parts = urlsplit(base_url)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect((parts.hostname, parts.port))
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())

    def close(self) -> None:
        self.sock.close()


async def watch_commands(settings: Settings, stream_id: str) -> list[float]:
    """When each watch command for ``stream_id`` was written (its record's timestamp, seconds)."""
    records = await consume(settings, settings.topic_commands, until=lambda got: True, linger_s=1.0)
    return [
        r.timestamp / 1000
        for r in records
        if r.key == stream_id.encode() and isinstance(parse_command(r.value or b""), WatchCommand)
    ]


def open_views() -> float:
    return float(LIVE_VIEWERS._value.get())


@pytest.mark.integration
async def test_watched_streams_are_asked_for_frames_that_reach_every_viewer_and_a_stalled_one_drops_alone(
    settings: Settings,
) -> None:
    own = await isolated_settings(
        settings, live_watch_every_s=0.5, live_watch_for_s=2.0, live_viewer_queue=8, live_stall_s=4.0
    )
    await ensure_topics(own, [own.topic_live])
    stream_id = (await add_streams(own, count=1, running=1))[0]
    headers = {"Authorization": f"Bearer {await new_api_key(own, Scope.READ)}"}
    producer: AIOKafkaProducer = create_producer(own, idempotent=False)
    await producer.start()
    views_before = open_views()
    async with served_api(own) as base_url, httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        url = (await client.post(f"/streams/{stream_id}/live", headers=headers)).json()["url"]
        got: list[bytes] = []
        stop = asyncio.Event()
        reader = asyncio.create_task(read_mjpeg(client, url, got, stop))
        stalled = StalledViewer(base_url, url)
        stalled_before = LIVE_VIEWERS_STALLED._value.get()
        dropped_before = LIVE_FRAMES_DROPPED.labels("viewer")._value.get()
        try:
            await eventually(lambda: open_views() == views_before + 2, what=lambda: "both views open")
            # ML's part: the watch comes, the annotated frames go to the live topic
            await eventually(
                lambda: watch_commands(own, stream_id), what=lambda: "a watch command for the watched stream"
            )

            async def probed() -> bool:  # the hub's consumer reads from the topic's end: wait for it
                await producer.send_and_wait(own.topic_live, b"probe", key=stream_id.encode())
                return b"probe" in got

            await eventually(probed, what=lambda: "a probe frame reaching the reading viewer")
            # 512 KB each: the stalled viewer's socket holds a few, its queue 8, the rest it drops
            frames = [os.urandom(512 * 1024) for _ in range(40)]
            for frame in frames:
                await producer.send_and_wait(own.topic_live, frame, key=stream_id.encode())
                await asyncio.sleep(0.05)
            await eventually(
                lambda: bool(got) and got[-1] == frames[-1],
                what=lambda: "the last frame at the reading viewer",
            )
            assert [f for f in got if f != b"probe"] == frames, "the reading viewer got every frame, in order"
            dropped = LIVE_FRAMES_DROPPED.labels("viewer")._value.get() - dropped_before
            assert dropped >= 10, f"the stalled viewer dropped only {dropped} frames"
            # the stalled viewer took nothing for live_stall_s: its view ends, the reader's goes on
            await eventually(
                lambda: LIVE_VIEWERS_STALLED._value.get() > stalled_before,
                what=lambda: "the stalled view ended",
            )
            await eventually(lambda: open_views() == views_before + 1, what=lambda: "one view left open")
        finally:
            stop.set()
            stalled.close()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await producer.stop()
        # nobody watches any more: the watches stop, so ML's encoding runs out after live_watch_for_s
        await eventually(lambda: open_views() == views_before, what=lambda: "every view closed")
        left_at = time.time()
        await asyncio.sleep(own.live_watch_every_s * 4)
        late = [t for t in await watch_commands(own, stream_id) if t > left_at + 0.2]
        assert late == [], f"{len(late)} watch commands after the viewers left"
