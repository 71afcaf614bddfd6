"""``lookout-janitor``: keeps the store within each stream's retention and the global budget.

Every ``janitor_interval_s`` a pass (one janitor at a time: a Postgres advisory lock):

1. finishes the deletions a pass before it left (the ``frame_deletions`` journal: S3 objects whose
   rows are already gone), in batched S3 deletes;
2. keeps the detections' time partitions: the next ones exist before rows reach them, and a past
   one whose frames are all due goes whole (``DROP TABLE``: no row-by-row delete, no bloat);
3. deletes the frames of streams an admin deleted, then the streams;
4. deletes frames older than their stream's ``frames_days``, then the oldest of a stream over its
   ``max_bytes``, then the oldest of all while the store is over ``storage_budget_bytes``;
5. deletes events older than their stream's ``events_days``; an event that outlives its frame
   is marked (``frame_deleted_at``) so its link says the frame expired;
6. samples the store's size for the forecast, and sweeps, now and then, objects that no row names
   (a detection process killed between its upload and its insert).

A frame's row and the journal entry for its object are written in one transaction, and the object
is deleted only after that: at every moment each object is named by a row or by the journal, and
each row's object exists. A pass killed anywhere leaves work the next one finishes. A pinned
event and its frame are never deleted by retention (only with their stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
from minio import Minio
from minio.deleteobjects import DeleteObject

from core.db import POSTGRES_DOWN, run_on_pool
from core.metrics import (
    JANITOR_PASS_SECONDS,
    STORAGE_DELETED_BYTES,
    STORAGE_DELETED_FRAMES,
    STORAGE_PENDING_DELETIONS,
    STORAGE_STREAM_BYTES,
)
from core.retention import PINS_LOCK, storage_usage
from core.retry import wait_any
from core.settings import Settings
from core.storage import create_s3_client, ensure_bucket
from workers.entrypoint import run_service

log = logging.getLogger(__name__)

PASS_LOCK = 0x6C6F6F6B  # pg advisory lock: one janitor pass at a time ("look")
SWEEP_EVERY_S = 3600.0  # objects that no row names are looked for this often
SWEEP_MIN_AGE_S = 600.0  # an object this young may still be waiting for its row
SAMPLES_KEPT = timedelta(days=2)
AT_CAP_INTERVAL_S = 5.0  # between passes while a byte cap deletes frames
KEY_SEQ = re.compile(r"/frames/(\d+)\.jpg$")

PINNED = """NOT EXISTS (SELECT 1 FROM events e
                  WHERE e.stream_id = d.stream_id AND e.frame_seq = d.frame_seq AND e.pinned_at IS NOT NULL)"""

# what follows the frames in ``gone`` (rows just deleted): their objects journalled, their streams'
# counters, their events marked; the frames and bytes
ACCOUNT_GONE = """
queued AS (
    INSERT INTO frame_deletions (stream_id, frame_seq, s3_key, bytes, reason)
    SELECT stream_id, frame_seq, s3_key, bytes, {reason} FROM gone
), counted AS (
    UPDATE stream_storage st
       SET bytes = st.bytes - g.bytes, frames = st.frames - g.frames,
           deleted_bytes = st.deleted_bytes + g.bytes, deleted_frames = st.deleted_frames + g.frames,
           deleted_through_seq = greatest(st.deleted_through_seq, g.seq),
           last_deletion_reason = {reason}, updated_at = now()
      FROM (SELECT stream_id, sum(bytes) AS bytes, count(*) AS frames, max(frame_seq) AS seq
              FROM gone GROUP BY stream_id) g
     WHERE st.stream_id = g.stream_id
), marked AS (
    UPDATE events e SET frame_deleted_at = now()
      FROM gone g
     WHERE e.stream_id = g.stream_id AND e.frame_seq = g.frame_seq AND e.frame_deleted_at IS NULL
)
SELECT count(*) AS frames, coalesce(sum(bytes), 0)::bigint AS bytes FROM gone
"""

# $1 batch, $2 bytes to free (NULL: every due frame in the batch), $3 reason, then the WHERE's own
DELETE_FRAMES = """
WITH victims AS (
    SELECT d.id, d.capture_time, d.bytes FROM detections d
     WHERE {where} {pinned}
     ORDER BY d.capture_time, d.id
     LIMIT $1
), chosen AS (
    SELECT id, capture_time FROM (
        SELECT id, capture_time, sum(bytes) OVER (ORDER BY capture_time, id) - bytes AS before FROM victims
    ) v
     WHERE $2::bigint IS NULL OR before < $2
), gone AS (
    DELETE FROM detections d USING chosen c
     WHERE d.id = c.id AND d.capture_time = c.capture_time
    RETURNING d.stream_id, d.frame_seq, d.s3_key, d.bytes
),""" + ACCOUNT_GONE.replace("{reason}", "$3")

# the same for a whole partition, before it is dropped ($1 reason)
JOURNAL_PARTITION = (
    "WITH gone AS (SELECT stream_id, frame_seq, s3_key, bytes FROM {part}),"
    + ACCOUNT_GONE.replace("{reason}", "$1")
)

# streams holding frames, with their retention (NULL: the settings' default)
RETAINED = """
SELECT s.id, s.delete_requested_at, st.bytes,
       (s.options->'retention'->>'frames_days')::float8 AS frames_days,
       (s.options->'retention'->>'events_days')::float8 AS events_days,
       (s.options->'retention'->>'max_bytes')::bigint AS max_bytes
  FROM streams s LEFT JOIN stream_storage st ON st.stream_id = s.id
"""


@dataclass
class PassReport:
    """What one pass did."""

    frames: int = 0  # rows deleted (their objects journalled)
    bytes: int = 0
    objects: int = 0  # S3 objects deleted
    events: int = 0
    partitions_dropped: int = 0
    partitions_created: int = 0
    streams_deleted: int = 0
    orphans: int = 0  # objects no row named, deleted by a sweep
    compacted: bool = False  # the S3 server was asked to give deleted objects' disk back
    by_reason: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, frames: int, nbytes: int) -> None:
        if not frames:
            return
        self.frames += frames
        self.bytes += nbytes
        self.by_reason[reason] = self.by_reason.get(reason, 0) + frames
        STORAGE_DELETED_FRAMES.labels(reason).inc(frames)
        STORAGE_DELETED_BYTES.labels(reason).inc(nbytes)


@dataclass(frozen=True)
class Partition:
    name: str
    lower: datetime
    upper: datetime


def partition_span(settings: Settings) -> timedelta:
    return timedelta(hours=settings.storage_partition_hours)


def partition_bounds(at: datetime, span: timedelta) -> tuple[datetime, datetime]:
    """The [lower, upper) span holding ``at``, aligned on the epoch."""
    seconds = span.total_seconds()
    lower = datetime.fromtimestamp((at.timestamp() // seconds) * seconds, UTC)
    return lower, lower + span


def partition_name(lower: datetime) -> str:
    return "detections_" + lower.astimezone(UTC).strftime("%Y%m%d_%H%M%S")


class Janitor:
    """One pass at a time over the whole store; ``run`` repeats it."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, s3: Minio | None = None) -> None:
        self.settings = settings
        self.pool = pool
        self.s3 = s3 or create_s3_client(settings)
        self.bucket = settings.s3_bucket_frames
        self._swept_at = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        log.info("janitor started", extra={"budget_bytes": self.settings.storage_budget_bytes})
        while not stop.is_set():
            pause = self.settings.janitor_interval_s
            try:
                report = await self.pass_once()
                if report is not None and (
                    report.frames or report.objects or report.events or report.orphans
                ):
                    log.info("janitor pass", extra=report.__dict__)
                if report is not None and {"budget", "stream_bytes"} & set(report.by_reason):
                    # at a byte cap, frames come as fast as they are deleted: look again soon, so
                    # the store overshoots by a few seconds of frames, not a whole interval
                    pause = min(pause, AT_CAP_INTERVAL_S)
            except POSTGRES_DOWN as err:
                log.warning("postgres unavailable, the janitor waits", extra={"error": str(err)})
            except Exception:  # S3 down, a statement refused: the next pass tries again
                log.exception("janitor pass failed")
            await wait_any(stop, None, pause)

    async def pass_once(self, *, sweep: bool | None = None) -> PassReport | None:
        """One pass; None when another janitor holds the pass lock."""
        started = time.perf_counter()
        async with self.pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", PASS_LOCK):
                return None
            try:
                report = PassReport()
                await self._finish_deletions(conn, report)
                await self._keep_partitions(conn, report)
                await self._delete_streams(conn, report)
                await self._apply_retention(conn, report)
                await self._finish_deletions(conn, report)
                if report.objects and self.settings.s3_compact_url:
                    report.compacted = await asyncio.to_thread(self._compact)
                due = time.monotonic() - self._swept_at >= SWEEP_EVERY_S
                if sweep if sweep is not None else due:
                    self._swept_at = time.monotonic()
                    await self._sweep_orphans(conn, report)
                await self._sample(conn)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", PASS_LOCK)
        JANITOR_PASS_SECONDS.observe(time.perf_counter() - started)
        return report

    # --- 1. the journal ------------------------------------------------------------------------------

    async def _finish_deletions(self, conn: asyncpg.Connection, report: PassReport) -> None:
        """Delete the journalled objects, batch by batch, then their journal rows."""
        while True:
            rows = await conn.fetch(
                "SELECT id, s3_key FROM frame_deletions ORDER BY id LIMIT $1", self.settings.janitor_batch
            )
            if not rows:
                break
            await asyncio.to_thread(self._delete_objects, [r["s3_key"] for r in rows])
            await conn.execute(
                "DELETE FROM frame_deletions WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
            )
            report.objects += len(rows)
        STORAGE_PENDING_DELETIONS.set(0)

    def _delete_objects(self, keys: list[str]) -> None:
        """One batched S3 delete; a key already gone is fine, any other failure raises."""
        errors = [
            e
            for e in self.s3.remove_objects(self.bucket, (DeleteObject(k) for k in keys))
            if e.code != "NoSuchKey"
        ]
        if errors:
            raise RuntimeError(f"S3 refused {len(errors)} deletes, e.g. {errors[0].name}: {errors[0].code}")

    def _compact(self) -> bool:
        """Ask the S3 server to compact what deletions left (``s3_compact_url``); never raises."""
        try:
            response = httpx.get(self.settings.s3_compact_url, timeout=300)
            response.raise_for_status()
        except httpx.HTTPError as err:
            log.warning("S3 compaction call failed", extra={"error": str(err)})
            return False
        return True

    # --- 2. partitions -------------------------------------------------------------------------------

    async def partitions(self, conn: asyncpg.Connection) -> list[Partition]:
        rows = await conn.fetch("SELECT name, lower, upper FROM detection_partitions ORDER BY lower")
        return [Partition(r["name"], r["lower"], r["upper"]) for r in rows]

    async def _keep_partitions(self, conn: asyncpg.Connection, report: PassReport) -> None:
        span = partition_span(self.settings)
        now = datetime.now(UTC)
        existing = await self.partitions(conn)
        for step in (-1, 0, 1, 2):
            lower, upper = partition_bounds(now + step * span, span)
            if any(p.lower < upper and lower < p.upper for p in existing):
                continue  # this span is covered (perhaps by partitions of another length)
            try:
                await self._create_partition(conn, Partition(partition_name(lower), lower, upper))
            except asyncpg.PostgresError as err:  # the rest of the pass goes on; rows wait in the default
                log.error(
                    "partition not created", extra={"partition": partition_name(lower), "error": str(err)}
                )
                continue
            report.partitions_created += 1
        await self._drop_partitions(conn, report, now)

    async def _create_partition(self, conn: asyncpg.Connection, part: Partition) -> None:
        """A range partition; rows the default partition holds in its range move into it."""
        bounds = f"FROM ('{part.lower.isoformat()}') TO ('{part.upper.isoformat()}')"
        async with conn.transaction():
            # what attaching takes anyway, from the start: no insert lands in the default partition's
            # range between the move and the attach
            await conn.execute("LOCK TABLE detections IN ACCESS EXCLUSIVE MODE")
            stray = await conn.fetchval(
                "SELECT count(*) FROM detections_default WHERE capture_time >= $1 AND capture_time < $2",
                part.lower,
                part.upper,
            )
            if not stray:
                await conn.execute(f"CREATE TABLE {part.name} PARTITION OF detections FOR VALUES {bounds}")
            else:
                await conn.execute(f"CREATE TABLE {part.name} (LIKE detections INCLUDING DEFAULTS)")
                await conn.execute(
                    f"WITH moved AS (DELETE FROM detections_default WHERE capture_time >= $1 AND capture_time < $2"
                    f" RETURNING *) INSERT INTO {part.name} SELECT * FROM moved",
                    part.lower,
                    part.upper,
                )
                await conn.execute(f"ALTER TABLE detections ATTACH PARTITION {part.name} FOR VALUES {bounds}")
            await conn.execute(
                "INSERT INTO detection_partitions (name, lower, upper) VALUES ($1, $2, $3)",
                part.name,
                part.lower,
                part.upper,
            )
        log.info("partition created", extra={"partition": part.name, "moved_rows": stray})

    async def _drop_partitions(self, conn: asyncpg.Connection, report: PassReport, now: datetime) -> None:
        """Past partitions go whole when empty, or when every frame in them is past every stream's
        frames_days (none pinned)."""
        longest_days = await conn.fetchval(
            "SELECT max(coalesce((s.options->'retention'->>'frames_days')::float8, $1))"
            "  FROM streams s JOIN stream_storage st ON st.stream_id = s.id WHERE st.frames > 0",
            self.settings.retention_frames_days,
        )
        due_before = now - timedelta(days=longest_days or self.settings.retention_frames_days)
        for part in await self.partitions(conn):
            if part.upper > now - partition_span(self.settings):
                break  # the current and coming ones stay
            if part.upper <= due_before or not await conn.fetchval(
                f"SELECT EXISTS (SELECT 1 FROM {part.name})"
            ):
                await self._drop_partition(conn, part, "age", report)

    async def _holds_pinned(self, conn: asyncpg.Connection, part: Partition) -> bool:
        return bool(
            await conn.fetchval(
                f"SELECT EXISTS (SELECT 1 FROM events e JOIN {part.name} d"
                "  ON d.stream_id = e.stream_id AND d.frame_seq = e.frame_seq WHERE e.pinned_at IS NOT NULL)"
            )
        )

    async def _drop_partition(
        self, conn: asyncpg.Connection, part: Partition, reason: str, report: PassReport
    ) -> bool:
        """Journal a partition's frames and drop it, unless it holds a pinned frame (False then). The
        table is locked first: no late frame lands in it unjournalled, no pin slips in between."""
        async with conn.transaction():
            await conn.execute("LOCK TABLE detections IN ACCESS EXCLUSIVE MODE")
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PINS_LOCK)
            if await self._holds_pinned(conn, part):
                return False
            row = await conn.fetchrow(JOURNAL_PARTITION.format(part=part.name), reason)
            await conn.execute(f"DROP TABLE {part.name}")
            await conn.execute("DELETE FROM detection_partitions WHERE name = $1", part.name)
        report.add(reason, row["frames"], row["bytes"])
        report.partitions_dropped += 1
        log.info(
            "partition dropped", extra={"partition": part.name, "reason": reason, "frames": row["frames"]}
        )
        return True

    # --- 3. deleted streams --------------------------------------------------------------------------

    async def _delete_streams(self, conn: asyncpg.Connection, report: PassReport) -> None:
        """Streams an admin deleted (DELETE /streams/{id}): frames, rows, events, then the stream."""
        for row in await conn.fetch("SELECT id FROM streams WHERE delete_requested_at IS NOT NULL"):
            stream_id = row["id"]
            await self._delete_frames(
                conn, report, "stream_deleted", "d.stream_id = $4", stream_id, pinned=False
            )
            async with conn.transaction():
                # the row locked: no frame can be inserted for the stream now (its foreign key
                # waits), and what came since the batches above is journalled with the rest
                await conn.execute("SELECT 1 FROM streams WHERE id = $1 FOR UPDATE", stream_id)
                last = await conn.fetchrow(
                    DELETE_FRAMES.format(where="d.stream_id = $4", pinned=""),
                    None,
                    None,
                    "stream_deleted",
                    stream_id,
                )
                report.add("stream_deleted", last["frames"], last["bytes"])
                gone = await conn.execute("DELETE FROM events WHERE stream_id = $1", stream_id)
                await conn.execute("DELETE FROM streams WHERE id = $1", stream_id)
            await self._finish_deletions(conn, report)
            report.orphans += await self._sweep_stream(conn, stream_id, min_age_s=0.0)
            report.events += int(gone.split()[-1])
            report.streams_deleted += 1
            with contextlib.suppress(KeyError):
                STORAGE_STREAM_BYTES.remove(str(stream_id))
            log.info("stream deleted with its frames and events", extra={"stream_id": str(stream_id)})

    # --- 4, 5. retention -----------------------------------------------------------------------------

    async def _apply_retention(self, conn: asyncpg.Connection, report: PassReport) -> None:
        now = datetime.now(UTC)
        streams = [r for r in await conn.fetch(RETAINED) if r["delete_requested_at"] is None]
        for s in streams:
            days = s["frames_days"] or self.settings.retention_frames_days
            await self._delete_frames(
                conn,
                report,
                "age",
                "d.stream_id = $4 AND d.capture_time < $5",
                s["id"],
                now - timedelta(days=days),
            )
        for s in await conn.fetch(RETAINED):
            if s["max_bytes"] is not None and (s["bytes"] or 0) > s["max_bytes"]:
                excess = s["bytes"] - s["max_bytes"]
                await self._delete_frames(
                    conn, report, "stream_bytes", "d.stream_id = $4", s["id"], excess=excess
                )
        total = await conn.fetchval("SELECT coalesce(sum(bytes), 0)::bigint FROM stream_storage")
        excess = total - self.settings.storage_budget_bytes
        if excess > 0:
            await self._free_budget(conn, report, excess)
        for s in streams:
            days = s["events_days"] or self.settings.retention_events_days
            gone = await conn.execute(
                "DELETE FROM events WHERE stream_id = $1 AND occurred_at < $2 AND pinned_at IS NULL",
                s["id"],
                now - timedelta(days=days),
            )
            if count := int(gone.split()[-1]):
                report.events += count
                await conn.execute(
                    "UPDATE stream_storage SET deleted_events = deleted_events + $2 WHERE stream_id = $1",
                    s["id"],
                    count,
                )

    async def _free_budget(self, conn: asyncpg.Connection, report: PassReport, excess: int) -> None:
        """The oldest frames of all streams until the store is within its budget: the oldest past
        partition whole when all of it must go, else row batches."""
        now = datetime.now(UTC)
        for part in await self.partitions(conn):
            if part.upper > now - partition_span(self.settings):
                break
            size = await conn.fetchval(f"SELECT coalesce(sum(bytes), 0)::bigint FROM {part.name}")
            if size > excess:
                break
            # every frame older than this partition's is gone already (oldest first)
            if await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM detections WHERE capture_time < $1)", part.lower
            ):
                break
            if not await self._drop_partition(conn, part, "budget", report):
                break
            excess -= size
        if excess > 0:
            await self._delete_frames(conn, report, "budget", "TRUE", excess=excess)

    async def _delete_frames(
        self,
        conn: asyncpg.Connection,
        report: PassReport,
        reason: str,
        where: str,
        *args: Any,
        excess: int | None = None,
        pinned: bool = True,
    ) -> None:
        """Delete the frames ``where`` selects, oldest first, batch by batch (until ``excess`` bytes
        are freed, when given); each batch's rows and journal entries in one transaction."""
        sql = DELETE_FRAMES.format(where=where, pinned=f"AND {PINNED}" if pinned else "")
        while True:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", PINS_LOCK)
                row = await conn.fetchrow(sql, self.settings.janitor_batch, excess, reason, *args)
            report.add(reason, row["frames"], row["bytes"])
            STORAGE_PENDING_DELETIONS.inc(row["frames"])
            if excess is not None:
                excess -= row["bytes"]
            # a short batch took all that was due, or enough bytes
            if row["frames"] < self.settings.janitor_batch or (excess is not None and excess <= 0):
                return
            await self._finish_deletions(conn, report)  # keep the journal short on big passes

    # --- 6. sweeping and sampling --------------------------------------------------------------------

    async def _sweep_orphans(self, conn: asyncpg.Connection, report: PassReport) -> None:
        """Every stream's prefix in the bucket, those of streams no longer in Postgres included."""
        for prefix in await asyncio.to_thread(self._stream_prefixes):
            try:
                stream_id = uuid.UUID(prefix)
            except ValueError:
                continue  # not Lookout's
            report.orphans += await self._sweep_stream(conn, stream_id, min_age_s=SWEEP_MIN_AGE_S)

    def _stream_prefixes(self) -> list[str]:
        ensure_bucket(self.s3, self.bucket)
        return [
            (o.object_name or "").removeprefix("streams/").rstrip("/")
            for o in self.s3.list_objects(self.bucket, prefix="streams/", recursive=False)
            if o.is_dir
        ]

    async def _sweep_stream(self, conn: asyncpg.Connection, stream_id: Any, *, min_age_s: float) -> int:
        """Delete the stream's objects that no row and no journal entry names (older than
        ``min_age_s``: a younger one may be waiting for its row)."""
        objects = await asyncio.to_thread(self._list_frames, str(stream_id))
        cutoff = datetime.now(UTC) - timedelta(seconds=min_age_s)
        deleted = 0
        # a stream gone from Postgres names nothing: all of its objects old enough are orphans
        for batch in _chunks(objects, self.settings.janitor_batch):
            seqs = {seq: key for key, seq, modified in batch if modified is None or modified <= cutoff}
            if not seqs:
                continue
            named = {
                r["frame_seq"]
                for r in await conn.fetch(
                    "SELECT frame_seq FROM detections WHERE stream_id = $1 AND frame_seq = ANY($2::bigint[])"
                    " UNION SELECT frame_seq FROM frame_deletions WHERE stream_id = $1 AND frame_seq = ANY($2::bigint[])",
                    stream_id,
                    list(seqs),
                )
            }
            orphans = [key for seq, key in seqs.items() if seq not in named]
            if orphans:
                await asyncio.to_thread(self._delete_objects, orphans)
                deleted += len(orphans)
        if deleted:
            log.warning(
                "objects no row named deleted", extra={"stream_id": str(stream_id), "objects": deleted}
            )
        return deleted

    def _list_frames(self, stream_id: str) -> list[tuple[str, int, datetime | None]]:
        ensure_bucket(self.s3, self.bucket)
        found = []
        for obj in self.s3.list_objects(self.bucket, prefix=f"streams/{stream_id}/frames/", recursive=True):
            match = KEY_SEQ.search(obj.object_name or "")
            if match:
                found.append((obj.object_name or "", int(match.group(1)), obj.last_modified))
        return found

    async def _sample(self, conn: asyncpg.Connection) -> None:
        await conn.execute(
            "INSERT INTO storage_samples (at, bytes, stored_bytes)"
            " SELECT now(), coalesce(sum(bytes), 0), coalesce(sum(stored_bytes), 0) FROM stream_storage"
            " ON CONFLICT (at) DO NOTHING"
        )
        await conn.execute("DELETE FROM storage_samples WHERE at < now() - $1::interval", SAMPLES_KEPT)
        await storage_usage(conn, self.settings.storage_budget_bytes, publish_metrics=True)


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Keep the store within its retention and budget until ``stop`` is set."""
    await run_on_pool(settings, stop, Janitor)


def main() -> None:
    """Console script ``lookout-janitor``."""
    run_service("janitor", serve, metrics_port=lambda s: s.metrics_port_janitor)
