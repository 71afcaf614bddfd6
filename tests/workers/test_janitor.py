"""The storage janitor on the real Postgres and SeaweedFS: retention by age and by bytes, the budget,
pins, whole partitions dropped, deleted streams, links that say a frame expired, and a janitor
killed mid-pass leaving nothing the next pass does not finish (both sides counted)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest
from minio import Minio
from prometheus_client import REGISTRY

from core.settings import Settings
from core.storage import create_s3_client, ensure_bucket
from deploy.servers import seaweed_compact_url
from tests.e2e.pipeline import served_api
from tests.running_services import new_api_key, running_api
from workers.janitor import Janitor, Partition, partition_bounds, partition_name
from workers.ml.store import frame_key

JPEG = 2000  # bytes per frame


@dataclass
class Store:
    settings: Settings
    pool: asyncpg.Pool
    s3: Minio

    @property
    def bucket(self) -> str:
        return self.settings.s3_bucket_frames

    async def stream(self, **retention: float) -> uuid.UUID:
        stream_id = uuid.uuid4()
        options = {"retention": retention} if retention else {}
        await self.pool.execute(
            "INSERT INTO streams (id, url_redacted, url_full, options, state) VALUES ($1, 'rtsp://h/x', 'rtsp://h/x', $2, 'inactive')",
            stream_id,
            options,
        )
        return stream_id

    async def fill(self, stream_id: uuid.UUID, times: list[datetime], first_seq: int = 1) -> list[int]:
        """A frame (object and row, counted) at each time; returns their frame_seqs."""
        seqs = list(range(first_seq, first_seq + len(times)))
        body = b"\xff\xd8" + b"x" * (JPEG - 2)

        def put(seq: int) -> None:
            self.s3.put_object(self.bucket, frame_key(str(stream_id), seq), io.BytesIO(body), len(body))

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, seqs))
        await self.pool.executemany(
            "INSERT INTO detections (stream_id, frame_seq, capture_time, s3_key, width, height, objects, bytes)"
            " VALUES ($1, $2, $3, $4, 64, 48, '[]', $5)",
            [
                (stream_id, seq, at, frame_key(str(stream_id), seq), JPEG)
                for seq, at in zip(seqs, times, strict=True)
            ],
        )
        await self.pool.execute(
            "INSERT INTO stream_storage AS st (stream_id, bytes, frames, stored_bytes, stored_frames)"
            " VALUES ($1, $2, $3, $2, $3) ON CONFLICT (stream_id) DO UPDATE"
            " SET bytes = st.bytes + $2, frames = st.frames + $3, stored_bytes = st.stored_bytes + $2,"
            " stored_frames = st.stored_frames + $3",
            stream_id,
            JPEG * len(seqs),
            len(seqs),
        )
        return seqs

    async def event(self, stream_id: uuid.UUID, seq: int, at: datetime, *, pinned: bool = False) -> int:
        return await self.pool.fetchval(
            "INSERT INTO events (event_id, stream_id, frame_seq, kind, zone, track_id, class_name, confidence,"
            " occurred_at, s3_key, pinned_at) VALUES ($1, $2, $3, 'entered', 'door', 1, 'person', 0.9, $4, $5,"
            " CASE WHEN $6 THEN now() END) RETURNING id",
            uuid.uuid4().hex,
            stream_id,
            seq,
            at,
            frame_key(str(stream_id), seq),
            pinned,
        )

    async def rows(self, stream_id: uuid.UUID | None = None) -> set[str]:
        return {
            r["s3_key"]
            for r in await self.pool.fetch(
                "SELECT s3_key FROM detections WHERE $1::uuid IS NULL OR stream_id = $1", stream_id
            )
        }

    async def journal(self) -> set[str]:
        return {r["s3_key"] for r in await self.pool.fetch("SELECT s3_key FROM frame_deletions")}

    async def objects(self) -> set[str]:
        def listed() -> set[str]:
            return {
                o.object_name or ""
                for o in self.s3.list_objects(self.bucket, prefix="streams/", recursive=True)
            }

        return await asyncio.to_thread(listed)

    async def assert_consistent(self, *, journal_empty: bool = True) -> None:
        """Every row's object exists; every object is named by a row (or, mid-pass, the journal);
        the counters equal the rows."""
        rows, journal, objects = await self.rows(), await self.journal(), await self.objects()
        assert rows <= objects, f"{len(rows - objects)} rows without their object"
        assert objects <= rows | journal, f"{len(objects - rows - journal)} orphan objects"
        if journal_empty:
            assert journal == set()
            assert objects == rows
        counted = await self.pool.fetch(
            "SELECT st.stream_id, st.bytes, st.frames, coalesce(d.bytes, 0) AS real_bytes, coalesce(d.frames, 0) AS real_frames"
            "  FROM stream_storage st LEFT JOIN (SELECT stream_id, sum(bytes) AS bytes, count(*) AS frames"
            "  FROM detections GROUP BY stream_id) d ON d.stream_id = st.stream_id"
        )
        for r in counted:
            assert (r["bytes"], r["frames"]) == (r["real_bytes"], r["real_frames"]), dict(r)


@pytest.fixture
async def store(settings: Settings, private_database: str) -> AsyncIterator[Store]:
    own = settings.model_copy(
        update={
            "database_url": settings.database_url.__class__(private_database),
            "s3_bucket_frames": f"janitor-{uuid.uuid4().hex[:12]}",
            "janitor_batch": 25,
            "storage_partition_hours": 1.0,
        }
    )
    s3 = create_s3_client(own)
    await asyncio.to_thread(ensure_bucket, s3, own.s3_bucket_frames)
    pool = await asyncpg.create_pool(private_database, min_size=1, max_size=4, init=_json_codec)
    try:
        yield Store(own, pool, s3)
    finally:
        await pool.close()


async def _json_codec(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


def ago(**delta: float) -> datetime:
    return datetime.now(UTC) - timedelta(**delta)


def spread(start: datetime, end: datetime, n: int) -> list[datetime]:
    step = (end - start) / n
    return [start + step * i for i in range(n)]


async def test_frames_past_their_streams_frames_days_go_oldest_first_and_a_pinned_event_keeps_its_frame(
    store: Store,
) -> None:
    short = await store.stream(frames_days=1, events_days=3)
    default = await store.stream()  # the settings' 7 days
    short_seqs = await store.fill(short, spread(ago(days=2), ago(hours=1), 40))
    await store.fill(default, spread(ago(days=2), ago(hours=1), 40))
    old = short_seqs[0]  # two days old
    pinned = await store.event(short, old, ago(days=2), pinned=True)
    kept_event = await store.event(short, short_seqs[1], ago(days=2) + timedelta(minutes=5))
    expired_event = await store.event(short, short_seqs[2], ago(days=4))  # past events_days

    report = await Janitor(store.settings, store.pool, store.s3).pass_once()

    assert report is not None
    remaining = await store.pool.fetch(
        "SELECT frame_seq, capture_time FROM detections WHERE stream_id = $1 ORDER BY frame_seq", short
    )
    cutoff = ago(days=1)
    assert [r["frame_seq"] for r in remaining if r["capture_time"] < cutoff] == [old], (
        "only the pinned one is old"
    )
    assert len(remaining) > 1, "the younger frames stay"
    deleted = set(short_seqs) - {r["frame_seq"] for r in remaining}
    assert deleted and max(deleted) < min(r["frame_seq"] for r in remaining if r["frame_seq"] != old)
    assert len(await store.rows(default)) == 40, "a stream kept 7 days loses nothing of two days"
    assert report.by_reason == {"age": len(deleted)}
    events = {r["id"]: r for r in await store.pool.fetch("SELECT id, frame_deleted_at FROM events")}
    assert events[pinned]["frame_deleted_at"] is None
    assert events[kept_event]["frame_deleted_at"] is not None, "the event outlives its frame, and says so"
    assert expired_event not in events
    await store.assert_consistent()


async def test_the_oldest_frames_of_all_streams_go_first_when_the_store_is_over_its_budget(
    store: Store,
) -> None:
    a, b = await store.stream(), await store.stream(max_bytes=30 * JPEG)
    times = {
        a: spread(ago(hours=6), ago(hours=1), 60),
        b: spread(ago(hours=5, minutes=30), ago(minutes=30), 60),
    }
    filled = {
        (s, seq): at for s in (a, b) for seq, at in zip(await store.fill(s, times[s]), times[s], strict=True)
    }
    budget = 50 * JPEG
    settings = store.settings.model_copy(update={"storage_budget_bytes": budget})

    report = await Janitor(settings, store.pool, store.s3).pass_once()

    assert report is not None and set(report.by_reason) == {"stream_bytes", "budget"}
    kept = {
        (r["stream_id"], r["frame_seq"])
        for r in await store.pool.fetch("SELECT stream_id, frame_seq FROM detections")
    }
    assert len([k for k in kept if k[0] == b]) <= 30, "b's own cap"
    assert budget - 25 * JPEG < len(kept) * JPEG <= budget, "within the budget, and not far below it"
    b_oldest = {(b, seq) for seq in range(1, 31)}  # what b's cap took
    by_budget = set(filled) - kept - b_oldest
    assert by_budget, "the budget deleted frames"
    assert max(filled[k] for k in by_budget) <= min(filled[k] for k in kept), "the oldest of all went first"
    await store.assert_consistent()
    assert await store.pool.fetchval("SELECT sum(deleted_frames) FROM stream_storage") == report.frames
    assert REGISTRY.get_sample_value("lookout_storage_bytes") == len(kept) * JPEG
    assert REGISTRY.get_sample_value("lookout_storage_budget_bytes") == budget
    assert REGISTRY.get_sample_value("lookout_storage_days_until_full") == 0, "at the budget: full"


async def test_a_past_partition_whose_frames_are_all_due_is_dropped_whole(store: Store) -> None:
    stream_id = await store.stream(frames_days=3 / 24)  # 3 hours
    old = await store.fill(stream_id, spread(ago(hours=6), ago(hours=4), 30))
    young = await store.fill(stream_id, spread(ago(minutes=30), ago(minutes=1), 10), first_seq=100)
    janitor = Janitor(store.settings, store.pool, store.s3)
    span = timedelta(hours=1)
    async with store.pool.acquire() as conn:  # after a downtime: the rows wait in the default partition
        assert await conn.fetchval("SELECT count(*) FROM detections_default") == 40
        for hours in (6, 5, 4):
            lower, upper = partition_bounds(ago(hours=hours), span)
            if not await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM detection_partitions WHERE lower = $1)", lower
            ):
                await janitor._create_partition(conn, Partition(partition_name(lower), lower, upper))
        moved = await conn.fetchval("SELECT count(*) FROM detections_default")
    assert moved < 40, "rows in a new partition's range moved into it"

    report = await janitor.pass_once()

    assert report is not None and report.partitions_dropped >= 2
    seqs = {r["frame_seq"] for r in await store.pool.fetch("SELECT frame_seq FROM detections")}
    assert seqs == set(young), "every frame past 3 hours went, the young stayed"
    assert not seqs & set(old)
    names = {r["name"] for r in await store.pool.fetch("SELECT name FROM detection_partitions")}
    tables = {
        r["relname"]
        for r in await store.pool.fetch(
            "SELECT relname FROM pg_class WHERE relname LIKE 'detections_2%' AND relkind = 'r'"
        )
    }
    assert names == tables, "the partition table and its record go together"
    await store.assert_consistent()


async def test_a_deleted_stream_loses_its_frames_events_and_row_and_links_to_its_frames_answer_410(
    store: Store,
) -> None:
    stream_id = await store.stream(frames_days=1)
    seqs = await store.fill(stream_id, spread(ago(days=2), ago(minutes=5), 20))
    kept = seqs[-1]
    await store.event(stream_id, seqs[0], ago(days=2), pinned=True)
    event_of_deleted = await store.event(stream_id, seqs[1], ago(days=2) + timedelta(minutes=1))
    janitor = Janitor(store.settings, store.pool, store.s3)
    await janitor.pass_once()

    async with running_api(store.settings) as api:
        answer = await api.get(f"/streams/{stream_id}/frames/{seqs[1]}")
        assert answer.status_code == 410
        assert "deleted by retention" in answer.json()["detail"] and "frames_days" in answer.json()["detail"]
        answer = await api.get(f"/streams/{stream_id}/frames/{kept}")
        assert answer.status_code == 307
        assert (await asyncio.to_thread(httpx.get, answer.headers["location"])).content.startswith(
            b"\xff\xd8"
        )
        assert (await api.get(f"/streams/{stream_id}/frames/999999")).status_code == 404
        event = next(
            e
            for e in (await api.get("/events", params={"id": str(stream_id)})).json()["items"]
            if e["id"] == event_of_deleted
        )
        assert event["image_url"] is None and event["frame_deleted_at"] is not None
        pinned = (await api.get("/events", params={"id": str(stream_id), "pinned": "true"})).json()["items"]
        assert len(pinned) == 1 and pinned[0]["image_url"] is not None
        assert (await api.delete(f"/events/{pinned[0]['id']}/pin")).json()["pinned_at"] is None
        assert (await api.post(f"/events/{pinned[0]['id']}/pin")).json()["pinned_at"] is not None
        storage = (await api.get(f"/state/{stream_id}")).json()["storage"]
        assert storage["frames"] == len(await store.rows(stream_id)) and storage["deleted_frames"] > 0
        total = (await api.get("/storage")).json()
        assert (
            total["bytes"] == storage["bytes"]
            and total["budget_bytes"] == store.settings.storage_budget_bytes
        )

        assert (await api.delete(f"/streams/{stream_id}")).status_code == 202
        assert (await api.get(f"/state/{stream_id}")).json()["deleting"] is True
        await janitor.pass_once()
        assert (await api.get(f"/state/{stream_id}")).status_code == 404
        assert (await api.get(f"/streams/{stream_id}/frames/{kept}")).status_code == 404

    assert await store.objects() == set()
    assert await store.pool.fetchval("SELECT count(*) FROM events WHERE stream_id = $1", stream_id) == 0
    await store.assert_consistent()


async def test_a_running_stream_cannot_be_deleted(store: Store) -> None:
    stream_id = await store.stream()
    await store.pool.execute("UPDATE streams SET state = 'ml_started' WHERE id = $1", stream_id)
    async with running_api(store.settings) as api:
        answer = await api.delete(f"/streams/{stream_id}")
    assert answer.status_code == 409 and "shut it down" in answer.json()["detail"]


async def test_a_janitor_killed_mid_pass_leaves_no_orphan_and_no_row_without_its_object(
    store: Store, tmp_path: Path
) -> None:
    streams = [await store.stream(), await store.stream()]
    for stream_id in streams:
        await store.fill(stream_id, spread(ago(hours=3), ago(minutes=1), 400))
    budget = 100 * JPEG  # 700 of the 800 frames must go, 10 per batch
    env = {
        **os.environ,
        "LOOKOUT_DATABASE_URL": store.settings.database_url.get_secret_value(),
        "LOOKOUT_S3_ENDPOINT": store.settings.s3_endpoint,
        "LOOKOUT_S3_ACCESS_KEY": store.settings.s3_access_key,
        "LOOKOUT_S3_SECRET_KEY": store.settings.s3_secret_key.get_secret_value(),
        "LOOKOUT_S3_BUCKET_FRAMES": store.bucket,
        "LOOKOUT_STORAGE_BUDGET_BYTES": str(budget),
        "LOOKOUT_JANITOR_BATCH": "10",
        "LOOKOUT_JANITOR_INTERVAL_S": "60",
        "LOOKOUT_METRICS_PORT_JANITOR": "0",
        "LOOKOUT_SECRET_KEY": store.settings.secret_key.get_secret_value(),
    }
    log = (tmp_path / "janitor.log").open("wb")
    janitor = subprocess.Popen(  # noqa: ASYNC220  (started once; the test then polls Postgres)
        [str(Path(sys.executable).parent / "lookout-janitor")], env=env, stderr=log
    )
    try:
        deadline = time.monotonic() + 60
        while not await store.pool.fetchval("SELECT sum(deleted_frames) FROM stream_storage"):
            assert janitor.poll() is None and time.monotonic() < deadline, (
                tmp_path / "janitor.log"
            ).read_text()
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.15)
        janitor.send_signal(signal.SIGKILL)
        janitor.wait(10)
    finally:
        if janitor.poll() is None:
            janitor.kill()
    deleted = await store.pool.fetchval("SELECT sum(deleted_frames) FROM stream_storage")
    assert 0 < deleted < 700, f"killed mid-pass: {deleted} of 700 deleted"
    await store.assert_consistent(journal_empty=False)  # even now: no orphan, no row without its object

    port = int(store.settings.s3_endpoint.rsplit(":", 1)[1])
    settings = store.settings.model_copy(
        update={"storage_budget_bytes": budget, "s3_compact_url": seaweed_compact_url(port)}
    )
    report = await Janitor(settings, store.pool, store.s3).pass_once()

    await store.assert_consistent()
    assert len(await store.rows()) == 100
    assert report is not None and report.compacted, "SeaweedFS was asked to give the disk back"


async def test_lookout_storage_shows_each_streams_frames_and_the_budget(store: Store) -> None:
    stream_id = await store.stream(frames_days=1)
    await store.fill(stream_id, spread(ago(days=2), ago(minutes=5), 20))
    await Janitor(store.settings, store.pool, store.s3).pass_once()
    # half an hour ago 40 kB less had been stored: 1.92 MB a day fills the budget's rest in that many days
    stored = await store.pool.fetchval("SELECT sum(stored_bytes) FROM stream_storage")
    await store.pool.execute("DELETE FROM storage_samples")
    await store.pool.execute(
        "INSERT INTO storage_samples (at, bytes, stored_bytes) VALUES (now() - interval '30 minutes', 0, $1)",
        stored - 40_000,
    )
    token = await new_api_key(store.settings)
    async with served_api(store.settings) as api:
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "lookout"),
            "storage",
            "--api",
            api,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "LOOKOUT_API_KEY": token, "COLUMNS": "200"},
        )
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    kept = len(await store.rows(stream_id))
    assert f"{kept} frames" in text and "of 20.0 GiB" in text, text
    line = next(row for row in text.splitlines() if row.startswith(str(stream_id)))
    assert f"{20 - kept} frames" in line and "age" in line, line
    left_bytes = store.settings.storage_budget_bytes - kept * JPEG
    days = left_bytes / (40_000 / 1800 * 86400)
    shown = re.search(r"the budget is reached in ([\d.]+) days", text)
    assert shown is not None and abs(float(shown.group(1)) / days - 1) < 0.01, (days, text)
