"""The ML service end to end on the real model, broker, S3 gateway and Postgres."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import cv2
import httpx
import numpy as np
import pytest

from core.messages import ErrorKind, EventKind, Service, StartCommand, StopCommand, StreamOptions
from core.settings import Settings
from core.states import StreamState
from core.storage import create_s3_client, presigned_get
from deploy import servers
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY
from tests.observing import eventually
from tests.ports import free_s3_port
from tests.workers.ml.conftest import (
    FrameSender,
    StateEvents,
    create_topics,
    frame_sender,
    frame_size,
    insert_stream,
    running_ml,
    state_events,
    topics_of_their_own,
)
from workers.ml.detector import default_weights
from workers.ml.engine import engine_key
from workers.ml.service import MLHandler

pytestmark = pytest.mark.integration

FAST = StreamOptions(imgsz=320)
SEALED_URL = "gAAAAA-ML-never-opens-it"  # the camera URL is the runner's only  # the service's default stays 640; tests keep the model cheap


@pytest.fixture(scope="module")
async def ml_settings(settings: Settings) -> Settings:
    result = topics_of_their_own(settings).model_copy(update={"ml_queue_size": 2})
    await create_topics(result)
    return result


@pytest.fixture(scope="module")
async def events(ml_settings: Settings) -> AsyncIterator[StateEvents]:
    async with state_events(ml_settings) as collected:
        yield collected


@pytest.fixture(scope="module")
async def sender(ml_settings: Settings) -> AsyncIterator[FrameSender]:
    async with frame_sender(ml_settings) as result:
        yield result


@pytest.fixture(scope="module")
async def ml_service(ml_settings: Settings, events: StateEvents) -> AsyncIterator[MLHandler]:
    async with running_ml(ml_settings) as handler:
        yield handler


async def rows_of(pool: asyncpg.Pool, stream_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT * FROM detections WHERE stream_id = $1 ORDER BY frame_seq", uuid.UUID(stream_id)
    )
    return rows


async def start(sender: FrameSender, stream_id: str, options: StreamOptions = FAST) -> None:
    command = StartCommand(stream_id=stream_id, url_sealed=SEALED_URL, options=options)
    await sender.command(stream_id, command.model_dump_json())


async def stop_and_wait_for_ack(sender: FrameSender, events: StateEvents, stream_id: str) -> None:
    await sender.command(stream_id, StopCommand(stream_id=stream_id).model_dump_json())
    ack = await events.wait_for(lambda e: e.stream_id == stream_id and e.kind is EventKind.ACK, 30)
    assert ack.error is None


def best_confidence(objects: list[dict[str, object]], class_name: str) -> float:
    return max((float(o["confidence"]) for o in objects if o["class"] == class_name), default=0.0)  # type: ignore[arg-type]


async def test_first_frames_start_the_process_and_become_rows_with_bus_and_person_and_jpeg_links(
    ml_service: MLHandler,
    ml_settings: Settings,
    sender: FrameSender,
    events: StateEvents,
    db_pool: asyncpg.Pool,
    bus_jpeg: bytes,
    zidane_jpeg: bytes,
) -> None:
    # no start command: the first frame starts the process, which reads its options from the row
    stream_id = await insert_stream(db_pool, FAST)
    await sender.frame(stream_id, 1, bus_jpeg, capture_ts=1_700_000_000.25)
    await sender.frame(stream_id, 2, zidane_jpeg)

    started = await events.wait_for(
        lambda e: e.stream_id == stream_id and e.state is StreamState.ML_STARTED, 60
    )
    assert (started.service.value, started.kind) == ("ml", EventKind.PROGRESS)
    await eventually(lambda: rows_count_is(db_pool, stream_id, 2), 30)

    bus, zidane = await rows_of(db_pool, stream_id)
    assert best_confidence(bus["objects"], "bus") > 0.5
    assert best_confidence(bus["objects"], "person") > 0.5
    assert sum(o["class"] == "person" for o in zidane["objects"]) >= 2
    assert best_confidence(zidane["objects"], "person") > 0.5
    assert bus["capture_time"].timestamp() == pytest.approx(1_700_000_000.25)
    assert bus["s3_key"] != zidane["s3_key"] and stream_id in bus["s3_key"]

    s3 = create_s3_client(ml_settings)
    async with httpx.AsyncClient() as http:
        for row, jpeg in ((bus, bus_jpeg), (zidane, zidane_jpeg)):
            url = presigned_get(s3, ml_settings.s3_bucket_frames, row["s3_key"], 60)
            response = await http.get(url)
            assert response.status_code == 200
            image = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR)
            assert image is not None, "the annotated frame is a valid JPEG"
            assert (image.shape[1], image.shape[0]) == frame_size(jpeg) == (row["width"], row["height"])

    await stop_and_wait_for_ack(sender, events, stream_id)


async def rows_count_is(pool: asyncpg.Pool, stream_id: str, count: int) -> bool:
    found = await pool.fetchval("SELECT count(*) FROM detections WHERE stream_id = $1", uuid.UUID(stream_id))
    return bool(found == count)


async def test_redelivered_frame_is_stored_once(
    ml_service: MLHandler, sender: FrameSender, events: StateEvents, db_pool: asyncpg.Pool, bus_jpeg: bytes
) -> None:
    stream_id = await insert_stream(db_pool)
    await start(sender, stream_id)
    await sender.frame(stream_id, 7, bus_jpeg)
    await sender.frame(stream_id, 7, bus_jpeg)  # the same frame again, as after a redelivery
    await eventually(
        lambda: stream_id in ml_service.streams and ml_service.streams[stream_id].stats.processed == 2, 60
    )
    stats = ml_service.streams[stream_id].stats
    assert (stats.processed, stats.stored) == (2, 1)
    assert [r["frame_seq"] for r in await rows_of(db_pool, stream_id)] == [7]
    await stop_and_wait_for_ack(sender, events, stream_id)


async def test_stop_lets_the_frame_in_hand_finish_then_acknowledges_and_the_process_is_gone(
    ml_service: MLHandler, sender: FrameSender, events: StateEvents, db_pool: asyncpg.Pool, bus_jpeg: bytes
) -> None:
    stream_id = await insert_stream(db_pool)
    await start(sender, stream_id, StreamOptions())  # 640: slow enough to be busy when the stop comes
    await sender.frame(stream_id, 1, bus_jpeg)
    await events.wait_for(lambda e: e.stream_id == stream_id and e.state is StreamState.ML_STARTED, 60)
    stream = ml_service.streams[stream_id]
    pid = stream.pid
    assert pid is not None and servers.pid_alive(pid)
    for seq in range(2, 6):
        await sender.frame(stream_id, seq, bus_jpeg)
    await eventually(lambda: stream.stats.handed > stream.stats.processed, 10, 0.01)  # a frame is in hand

    await stop_and_wait_for_ack(sender, events, stream_id)

    assert stream_id not in ml_service.streams
    assert not servers.pid_alive(pid), "the stream's process is gone"
    assert stream.exitcode == 0, "it exited by itself after its frame, not terminated"
    stats = ml_service.finished[stream_id]
    assert stats.busy_at_stop, "the stop came while a frame was in hand"
    assert stats.processed == stats.handed >= 2, "the frame in hand was finished, not abandoned"
    assert len(await rows_of(db_pool, stream_id)) == stats.stored == stats.handed
    assert stats.handed + stats.dropped + stats.discarded == stats.received

    await sender.frame(stream_id, 99, bus_jpeg)  # a late frame of the stopped stream
    await asyncio.sleep(1)
    assert stream_id not in ml_service.streams, "a late frame does not restart a stopped stream"


async def test_stop_of_a_stream_never_seen_is_acknowledged(
    ml_service: MLHandler, sender: FrameSender, events: StateEvents
) -> None:
    stream_id = str(uuid.uuid4())
    await stop_and_wait_for_ack(sender, events, stream_id)
    assert [e.kind for e in events.of(stream_id)] == [EventKind.ACK]
    assert stream_id not in ml_service.streams


async def test_frames_of_a_stream_without_a_row_or_already_ended_start_no_detection(
    ml_service: MLHandler, sender: FrameSender, events: StateEvents, db_pool: asyncpg.Pool, bus_jpeg: bytes
) -> None:
    ended = await insert_stream(db_pool)
    await db_pool.execute("UPDATE streams SET state = 'inactive' WHERE id = $1", uuid.UUID(ended))
    unknown = str(uuid.uuid4())
    for stream_id in (ended, unknown):
        await sender.frame(stream_id, 1, bus_jpeg)  # e.g. delivered again after the stream ended
    await eventually(lambda: ended in ml_service.finished and unknown in ml_service.finished, 30)
    assert ended not in ml_service.streams and unknown not in ml_service.streams
    assert ml_service.finished[ended].handed == 0
    await sender.frame(ended, 2, bus_jpeg)
    await asyncio.sleep(0.5)
    assert ended not in ml_service.streams, "later frames start nothing either"
    assert events.of(ended) == [] and events.of(unknown) == []
    assert await rows_of(db_pool, ended) == []


async def test_overload_keeps_the_queue_bounded_counts_drops_and_processes_the_newest_frames(
    ml_service: MLHandler,
    ml_settings: Settings,
    sender: FrameSender,
    events: StateEvents,
    db_pool: asyncpg.Pool,
    bus_jpeg: bytes,
) -> None:
    stream_id = await insert_stream(db_pool)
    await start(sender, stream_id, StreamOptions())
    await sender.frame(stream_id, 1, bus_jpeg)
    await events.wait_for(lambda e: e.stream_id == stream_id and e.state is StreamState.ML_STARTED, 60)
    stream = ml_service.streams[stream_id]

    offered = 40
    for seq in range(2, offered + 2):  # far faster than the model runs at 640 on a CPU
        await sender.frame(stream_id, seq, bus_jpeg)
    await eventually(
        lambda: (
            stream.stats.received == offered + 1
            and len(stream.queue) == 0
            and stream.stats.processed == stream.stats.handed
        ),
        60,
    )

    stats = stream.stats
    assert stats.queue_high_water <= ml_settings.ml_queue_size == 2
    assert stats.dropped > offered // 2, "most frames were dropped, not queued"
    assert stats.handed + stats.dropped == stats.received
    seqs = [r["frame_seq"] for r in await rows_of(db_pool, stream_id)]
    assert seqs[-1] == offered + 1, "the newest frame was processed"
    assert len(seqs) == stats.handed < offered // 2
    await stop_and_wait_for_ack(sender, events, stream_id)


async def test_model_that_fails_to_load_reports_an_error_event_with_the_reason(
    settings: Settings, db_pool: asyncpg.Pool, tmp_path: Path, bus_jpeg: bytes
) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a torch checkpoint")
    own = topics_of_their_own(settings).model_copy(update={"ml_model": str(broken)})
    await create_topics(own)
    stream_id = await insert_stream(db_pool)
    async with (
        state_events(own) as collected,
        frame_sender(own) as send,
        running_ml(own) as service,
    ):
        await start(send, stream_id)
        error = await collected.wait_for(lambda e: e.stream_id == stream_id and e.kind is EventKind.ERROR, 60)
        assert error.service.value == "ml"
        assert error.error is not None and "broken.pt" in error.error and "failed to load" in error.error
        assert error.error_kind is ErrorKind.FATAL, "no restart makes a broken model load"
        await eventually(lambda: stream_id in service.finished, 10)
        await send.frame(stream_id, 1, bus_jpeg)  # frames of a failed stream start nothing
        await stop_and_wait_for_ack(send, collected, stream_id)
        assert stream_id not in service.streams
    assert await rows_of(db_pool, stream_id) == []


async def test_streams_on_one_model_share_its_engine_and_a_stream_may_name_another_model(
    settings: Settings, db_pool: asyncpg.Pool, tmp_path: Path, bus_jpeg: bytes
) -> None:
    mine = tmp_path / "mine.pt"  # a user's own weights (here a copy of the shipped ones)
    shutil.copyfile(default_weights(), mine)
    own = topics_of_their_own(settings).model_copy(update={"ml_weights": {"mine": mine}})
    await create_topics(own)
    options = [FAST, FAST, FAST.model_copy(update={"model": "mine"})]
    streams = [await insert_stream(db_pool, o) for o in options]
    async with state_events(own) as collected, frame_sender(own) as send, running_ml(own) as service:
        for stream_id, option in zip(streams, options, strict=True):
            await start(send, stream_id, option)
            await send.frame(stream_id, 1, bus_jpeg)
        for stream_id in streams:
            await eventually(lambda sid=stream_id: rows_count_is(db_pool, sid, 1), 90)  # type: ignore[misc]
        assert service.engines is not None
        assert sorted(key.weights for key in service.engines.running()) == ["", str(mine)]
        for stream_id in streams:
            (row,) = await rows_of(db_pool, stream_id)
            assert best_confidence(row["objects"], "bus") > 0.5
            await stop_and_wait_for_ack(send, collected, stream_id)


async def test_s3_stopped_for_a_few_seconds_mid_stream_loses_no_frame_in_hand(
    settings: Settings, db_pool: asyncpg.Pool, tmp_path: Path, bus_jpeg: bytes, zidane_jpeg: bytes
) -> None:
    port = free_s3_port()
    gateway = servers.s3_server(tmp_path / "s3", port, S3_ACCESS_KEY, S3_SECRET_KEY)
    proc = gateway.start()
    own = topics_of_their_own(settings).model_copy(update={"s3_endpoint": f"127.0.0.1:{port}"})
    await create_topics(own)
    stream_id = await insert_stream(db_pool)
    try:
        async with (
            state_events(own) as collected,
            frame_sender(own) as send,
            running_ml(own) as service,
        ):
            await start(send, stream_id)
            await send.frame(stream_id, 1, bus_jpeg)
            await eventually(lambda: rows_count_is(db_pool, stream_id, 1), 60)
            stream = service.streams[stream_id]

            servers.stop_process_group(proc.pid)
            await send.frame(stream_id, 2, zidane_jpeg)
            await send.frame(stream_id, 3, bus_jpeg)
            await eventually(lambda: stream.stats.handed == 2, 10)  # frame 2 in hand, 3 queued
            await asyncio.sleep(3)
            assert stream.stats.processed == 1, "frame 2 waits for S3"
            proc = gateway.start()

            await eventually(lambda: rows_count_is(db_pool, stream_id, 3), 60)
            assert stream.stats.dropped == 0
            s3 = create_s3_client(own)
            async with httpx.AsyncClient() as http:
                for row in await rows_of(db_pool, stream_id):
                    url = presigned_get(s3, own.s3_bucket_frames, row["s3_key"], 60)
                    assert (await http.get(url)).status_code == 200
            await stop_and_wait_for_ack(send, collected, stream_id)
    finally:
        servers.stop_process_group(proc.pid)


async def test_frames_left_queued_at_service_shutdown_are_detected_by_the_next_run(
    settings: Settings, db_pool: asyncpg.Pool, bus_jpeg: bytes
) -> None:
    own = topics_of_their_own(settings).model_copy(update={"ml_queue_size": 8})
    await create_topics(own)
    group = f"test-ml-{uuid.uuid4().hex[:8]}"
    stream_id = await insert_stream(db_pool, FAST)  # the next run reads these options from the row
    async with frame_sender(own) as send:
        async with running_ml(own, group) as first:
            await start(send, stream_id, StreamOptions())  # 640: frames queue up behind the model
            await send.frame(stream_id, 1, bus_jpeg)
            await eventually(lambda: rows_count_is(db_pool, stream_id, 1), 60)
            stream = first.streams[stream_id]
            for seq in range(2, 8):
                await send.frame(stream_id, seq, bus_jpeg)
            await eventually(lambda: stream.stats.received == 7, 10, 0.01)
            assert len(stream.queue) > 0, "frames are still queued when the service stops"
        left_behind = 7 - len(await rows_of(db_pool, stream_id))
        assert left_behind > 0

        async with running_ml(own, group):  # the next run of the same consumer group
            await eventually(lambda: rows_count_is(db_pool, stream_id, 7), 60)
            await send.command(stream_id, StopCommand(stream_id=stream_id).model_dump_json())


async def test_a_stream_has_heartbeats_with_its_live_figures_and_a_restart_replaces_its_process(
    ml_service: MLHandler,
    sender: FrameSender,
    events: StateEvents,
    db_pool: asyncpg.Pool,
    bus_jpeg: bytes,
) -> None:
    stream_id = await insert_stream(db_pool, FAST)
    await start(sender, stream_id)
    for seq in range(1, 4):  # one at a time: this module's queue holds two
        await sender.frame(stream_id, seq, bus_jpeg)
        await eventually(lambda n=seq: rows_count_is(db_pool, stream_id, n), 60)

    beat = await events.wait_for(
        lambda e: (
            e.stream_id == stream_id
            and e.kind is EventKind.HEARTBEAT
            and e.figures is not None
            and e.figures.frames_stored == 3
        ),
        10,
    )
    figures = beat.figures
    assert figures is not None and beat.service is Service.ML
    assert figures.frames_processed == figures.frames_received == 3 and figures.frames_stored == 3
    assert figures.queue_depth == 0 and figures.frames_dropped == 0
    assert figures.newest_frame_age_s is not None

    old_pid = ml_service.streams[stream_id].pid
    restart = StartCommand(stream_id=stream_id, url_sealed=SEALED_URL, options=FAST, replace=True)
    await sender.command(stream_id, restart.model_dump_json())
    await eventually(
        lambda: stream_id in ml_service.streams and ml_service.streams[stream_id].pid != old_pid, 30
    )
    await sender.frame(stream_id, 4, bus_jpeg)
    await eventually(lambda: rows_count_is(db_pool, stream_id, 4), 60)
    assert not [e for e in events.of(stream_id) if e.kind is EventKind.ERROR]
    await stop_and_wait_for_ack(sender, events, stream_id)


async def test_a_killed_detection_process_is_reported_and_the_engine_and_the_other_stream_go_on(
    ml_service: MLHandler,
    sender: FrameSender,
    events: StateEvents,
    db_pool: asyncpg.Pool,
    bus_jpeg: bytes,
) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    stream_id, other = await insert_stream(db_pool, FAST), await insert_stream(db_pool, FAST)
    for sid in (stream_id, other):
        await start(sender, sid)
        await sender.frame(sid, 1, bus_jpeg)
        await eventually(lambda sid=sid: rows_count_is(db_pool, sid, 1), 60)  # type: ignore[misc]
    assert ml_service.engines is not None
    key = engine_key(ml_service.settings, FAST)  # one model: one engine for both (others may idle)
    engine = ml_service.engines.pid(key)
    assert engine is not None
    pid = ml_service.streams[stream_id].pid
    assert pid is not None

    os.kill(pid, signal.SIGKILL)
    error = await events.wait_for(lambda e: e.stream_id == stream_id and e.kind is EventKind.ERROR, 10)
    assert error.error_kind is ErrorKind.PROCESS and "exit code -9" in (error.error or "")
    await sender.frame(other, 2, bus_jpeg)
    await eventually(lambda: rows_count_is(db_pool, other, 2), 30)
    assert ml_service.engines.pid(key) == engine, "the engine was not disturbed"
    assert ml_service.engines.restarts == 0
    assert not [e for e in events.of(other) if e.kind is EventKind.ERROR]
    await stop_and_wait_for_ack(sender, events, stream_id)
    await stop_and_wait_for_ack(sender, events, other)
    assert set(os.listdir("/dev/shm")) <= shm_before, "no shared memory left behind"


async def test_a_killed_engine_is_restarted_and_its_streams_go_on_in_the_same_processes(
    ml_service: MLHandler,
    sender: FrameSender,
    events: StateEvents,
    db_pool: asyncpg.Pool,
    bus_jpeg: bytes,
) -> None:
    streams = [await insert_stream(db_pool, FAST) for _ in range(2)]
    for sid in streams:
        await start(sender, sid)
        await sender.frame(sid, 1, bus_jpeg)
        await eventually(lambda sid=sid: rows_count_is(db_pool, sid, 1), 60)  # type: ignore[misc]
    assert ml_service.engines is not None
    key = engine_key(ml_service.settings, FAST)
    engine = ml_service.engines.pid(key)
    assert engine is not None
    processes = [ml_service.streams[sid].pid for sid in streams]
    restarts = ml_service.engines.restarts

    os.kill(engine, signal.SIGKILL)
    for seq in (2, 3):
        for sid in streams:
            await sender.frame(sid, seq, bus_jpeg)
    for sid in streams:
        await eventually(lambda sid=sid: rows_count_is(db_pool, sid, 3), 60)  # type: ignore[misc]
    assert ml_service.engines.restarts == restarts + 1
    assert ml_service.engines.pid(key) not in (None, engine)
    assert [ml_service.streams[sid].pid for sid in streams] == processes, "the streams waited for it"
    for sid in streams:
        assert not [e for e in events.of(sid) if e.kind is EventKind.ERROR]
        await stop_and_wait_for_ack(sender, events, sid)
