"""Where a stream process keeps its results: annotated JPEGs in S3, detection rows in Postgres.

Both writes retry with backoff while their server is down, so a brief outage delays the frame in
hand instead of losing it. Blocking on purpose: it runs inside the per-stream process.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import psycopg
import urllib3
from minio.error import InvalidResponseError, S3Error, ServerError
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pydantic import ValidationError
from tenacity import retry_if_exception

from core.analytics import AnalyticsEvent, AnalyticsKind, Direction
from core.detections import DetectedObject
from core.messages import FrameHeaders
from core.outbox import INSERT_ONE, analytics_message
from core.retry import Stopped, retrying_blocking
from core.settings import Settings
from core.storage import create_s3_client, ensure_bucket
from core.streams import COLUMNS, StreamRow

log = logging.getLogger(__name__)

T = TypeVar("T")

INSERT_EVENT = """
INSERT INTO events (event_id, stream_id, frame_seq, kind, zone, direction, track_id, class_name,
                    confidence, dwell_s, occurred_at, s3_key, cause)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (event_id) DO NOTHING
RETURNING id
"""
# visits a stream's earlier detection process left open: entered, and no left for that track after it
OPEN_VISITS = """
SELECT e.zone, e.track_id, e.class_name, e.occurred_at
  FROM events e
 WHERE e.stream_id = %s AND e.kind = 'entered'
   AND NOT EXISTS (SELECT 1 FROM events l
                    WHERE l.stream_id = e.stream_id AND l.kind = 'left' AND l.zone = e.zone
                      AND l.track_id = e.track_id AND l.id > e.id)
"""
# a delivery when the stream has a webhook_url now (its row decides, not the process's copy of it)
INSERT_DELIVERY = """
INSERT INTO webhook_deliveries (event_pk, stream_id)
SELECT %s, id FROM streams WHERE id = %s AND options->>'webhook_url' IS NOT NULL
ON CONFLICT DO NOTHING
"""
INSERT_MQTT_DELIVERY = "INSERT INTO mqtt_deliveries (event_pk) VALUES (%s) ON CONFLICT DO NOTHING"
# occupancy None: unchanged; the counts are increments
UPSERT_FIGURES = """
INSERT INTO stream_analytics AS a (stream_id, name, shape, occupancy, count_in, count_out)
VALUES (%s, %s, %s, COALESCE(%s, 0), %s, %s)
ON CONFLICT (stream_id, name) DO UPDATE
   SET occupancy = COALESCE(EXCLUDED.occupancy, a.occupancy),
       count_in = a.count_in + EXCLUDED.count_in,
       count_out = a.count_out + EXCLUDED.count_out,
       updated_at = now()
"""


@dataclass(frozen=True)
class OpenVisit:
    """A zone visit an earlier detection process of the stream left open."""

    zone: str
    track_id: int
    class_name: str
    entered_at: float  # seconds since the epoch


@dataclass(frozen=True)
class AnalyticsResume:
    """What a new detection process takes up from its predecessors (``DetectionStore.analytics_resume``)."""

    last_track_id: int = 0
    open_visits: list[OpenVisit] = field(default_factory=list)


@dataclass(frozen=True)
class FrameAnalytics:
    """What a frame adds to a stream's analytics: its events, and the zones' occupancy when it changed."""

    stream_id: str
    events: list[AnalyticsEvent]
    occupancy: dict[str, int] | None  # every zone's occupancy after this frame; None: unchanged

    def figures(self) -> dict[str, tuple[str, int | None, int, int]]:
        """Per zone and line: (shape, occupancy or None, count_in, count_out) increments. A zone's
        counts are its entered and left events, a line's its crossings in and out."""
        figures: dict[str, tuple[str, int | None, int, int]] = {
            name: ("zone", now, 0, 0) for name, now in (self.occupancy or {}).items()
        }
        for event in self.events:
            shape = "line" if event.kind is AnalyticsKind.CROSSED else "zone"
            shape, occupancy, count_in, count_out = figures.get(event.zone, (shape, None, 0, 0))
            if event.kind is AnalyticsKind.ENTERED or event.direction is Direction.IN:
                count_in += 1
            elif event.kind is AnalyticsKind.LEFT or event.direction is Direction.OUT:
                count_out += 1
            figures[event.zone] = (shape, occupancy, count_in, count_out)
        return figures


# One row per frame of a stream: a redelivered frame, the same frame from a second runner during a
# handover, or a frame whose object retention is deleting (journalled) is not inserted again.
INSERT_DETECTION = """
INSERT INTO detections (stream_id, frame_seq, capture_time, s3_key, width, height, objects, bytes)
SELECT %(stream_id)s, %(frame_seq)s, %(capture_time)s, %(s3_key)s, %(width)s, %(height)s, %(objects)s, %(bytes)s
 WHERE NOT EXISTS (SELECT 1 FROM detections WHERE stream_id = %(stream_id)s AND frame_seq = %(frame_seq)s)
   AND NOT EXISTS (SELECT 1 FROM frame_deletions WHERE stream_id = %(stream_id)s AND frame_seq = %(frame_seq)s)
ON CONFLICT (stream_id, frame_seq, capture_time) DO NOTHING
"""
# the stream's storage counters (the janitor takes deleted frames off them)
COUNT_STORED = """
INSERT INTO stream_storage AS st (stream_id, bytes, frames, stored_bytes, stored_frames)
VALUES (%s, %s, 1, %s, 1)
ON CONFLICT (stream_id) DO UPDATE
   SET bytes = st.bytes + EXCLUDED.bytes, frames = st.frames + 1,
       stored_bytes = st.stored_bytes + EXCLUDED.bytes, stored_frames = st.stored_frames + 1,
       updated_at = now()
"""


def _write_figures(conn: psycopg.Connection, analytics: FrameAnalytics) -> None:
    """The zones' occupancy and the shapes' count increments of a frame (in the caller's transaction)."""
    for name, (shape, occupancy, count_in, count_out) in analytics.figures().items():
        conn.execute(UPSERT_FIGURES, (analytics.stream_id, name, shape, occupancy, count_in, count_out))


def frame_key(stream_id: str, frame_seq: int) -> str:
    """The S3 key of a stream's annotated frame; the same frame always lands on the same key."""
    return f"streams/{stream_id}/frames/{frame_seq:012d}.jpg"


# What a server that is down, restarting or overloaded raises; anything else is a bug or a
# misconfiguration that no retry fixes.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    urllib3.exceptions.HTTPError,
    ServerError,
    InvalidResponseError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)
# S3 answers that no retry fixes: wrong credentials or bucket name
PERMANENT_S3_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidBucketName"}


class PermanentStoreError(Exception):
    """A write that no retry can fix (e.g. the stream's row does not exist); the frame is skipped."""


class StoreClosed(Exception):
    """The store was closed while a write was waiting for its server."""


class DetectionStore:
    """Uploads annotated frames and inserts detection rows, idempotent on ``(stream_id, frame_seq)``."""

    def __init__(self, settings: Settings, *, retry_first_s: float = 0.2, retry_max_s: float = 5.0) -> None:
        self._settings = settings
        self._bucket = settings.s3_bucket_frames
        self._s3 = create_s3_client(settings)
        self._bucket_ready = False
        self._db: psycopg.Connection | None = None
        self._retry_delays = (retry_first_s, retry_max_s)
        self._closed = False

    def save(
        self,
        headers: FrameHeaders,
        jpeg: bytes,
        objects: list[DetectedObject],
        analytics: FrameAnalytics | None = None,
    ) -> bool:
        """Store one annotated frame; False when its row already existed (a redelivered frame).

        With ``analytics``, the frame's events (with their outbox messages and webhook deliveries)
        and the zones' occupancy and lines' counts are written in the row's transaction, and only
        when the row is new: a redelivered frame stores no second event.

        Retries each write until it succeeds; raises PermanentStoreError when a write cannot succeed.
        """
        key = frame_key(headers.stream_id, headers.frame_seq)
        context = {"stream_id": headers.stream_id, "frame_seq": headers.frame_seq}
        self._retry("s3 upload", lambda: self._put(key, jpeg), context)
        row = {
            "stream_id": headers.stream_id,
            "frame_seq": headers.frame_seq,
            "capture_time": datetime.fromtimestamp(headers.capture_ts, UTC),
            "s3_key": key,
            "width": headers.width,
            "height": headers.height,
            "objects": Jsonb([o.model_dump(mode="json", exclude_none=True) for o in objects]),
            "bytes": len(jpeg),
        }
        return self._retry("detection insert", lambda: self._insert(row, analytics), context)

    def save_occupancy(self, analytics: FrameAnalytics) -> None:
        """The zones' occupancy of a frame the store policy does not keep (it carries no event: the
        figures are absolute, so writing them twice is harmless). Retries like ``save``."""
        if analytics.events:
            raise ValueError("a frame with events is stored with them (save)")

        def write() -> None:
            try:
                conn = self._connection()
                with conn.transaction():
                    _write_figures(conn, analytics)
            except psycopg.errors.ForeignKeyViolation as err:
                raise PermanentStoreError(f"stream {analytics.stream_id} has no row in streams") from err
            except (psycopg.OperationalError, psycopg.InterfaceError):
                self._drop_connection()
                raise

        self._retry("occupancy update", write, {"stream_id": analytics.stream_id})

    def analytics_resume(self, stream_id: str) -> AnalyticsResume:
        """Where a new detection process of the stream takes its analytics up: the track ids used so
        far and the zone visits left open (an ``entered`` with no ``left`` after it). One attempt:
        raises psycopg.OperationalError when Postgres does not answer."""
        try:
            with self._connection().cursor() as cursor:
                row = cursor.execute(
                    "SELECT coalesce(max(track_id), 0) FROM events WHERE stream_id = %s", (stream_id,)
                ).fetchone()
                visits = cursor.execute(OPEN_VISITS, (stream_id,)).fetchall()
        except (psycopg.OperationalError, psycopg.InterfaceError):
            self._drop_connection()
            raise
        return AnalyticsResume(
            last_track_id=int(row[0]) if row else 0,
            open_visits=[
                OpenVisit(zone, track_id, class_name, at.timestamp())
                for zone, track_id, class_name, at in visits
            ],
        )

    def stream_row(self, stream_id: str) -> StreamRow | None:
        """The stream's row; None when it has none.

        Raises psycopg.OperationalError when Postgres does not answer (one attempt, no retry).
        """
        try:
            with self._connection().cursor(row_factory=dict_row) as cursor:
                found = cursor.execute(
                    f"SELECT {COLUMNS} FROM streams WHERE id = %s", (stream_id,)
                ).fetchone()
        except (psycopg.OperationalError, psycopg.InterfaceError):
            self._drop_connection()
            raise
        except psycopg.DataError:  # not a uuid: no such stream
            return None
        if found is None:
            return None
        try:
            return StreamRow.from_record(found)
        except ValidationError as err:  # options written by a newer release: detect with the defaults
            log.warning("stream options unreadable", extra={"stream_id": stream_id, "error": str(err)})
            return StreamRow.from_record({**found, "options": {}})

    def close(self) -> None:
        """Close the Postgres connection; a write still retrying gives up with StoreClosed."""
        self._closed = True
        self._drop_connection()

    def _retry(self, what: str, attempt: Callable[[], T], context: dict[str, object]) -> T:
        """``attempt()`` until it succeeds, with the retry policy while its server is down."""

        def transient(error: BaseException) -> bool:
            if isinstance(error, S3Error):
                return error.code not in PERMANENT_S3_CODES
            return isinstance(error, TRANSIENT_ERRORS)

        try:
            for retry in retrying_blocking(
                self._settings,
                what,
                retry=retry_if_exception(transient),
                give_up=lambda: self._closed,
                context=context,
                initial_s=self._retry_delays[0],
                max_s=self._retry_delays[1],
            ):
                with retry:
                    if self._closed:
                        raise StoreClosed(f"{what} abandoned: store closed")
                    return attempt()
        except Stopped as err:
            raise StoreClosed(f"{what} abandoned: store closed") from err
        except S3Error as err:  # one that no retry fixes: wrong credentials or bucket name
            raise PermanentStoreError(f"{what}: {err.code}: {err.message}") from err
        raise AssertionError("unreachable: retrying ends in a return or an error")

    def _put(self, key: str, jpeg: bytes) -> None:
        if not self._bucket_ready:
            ensure_bucket(self._s3, self._bucket)
            self._bucket_ready = True
        try:
            self._s3.put_object(self._bucket, key, io.BytesIO(jpeg), len(jpeg), content_type="image/jpeg")
        except Exception:
            self._bucket_ready = False  # a recreated S3 store may have lost the bucket
            raise

    def _insert(self, row: dict[str, object], analytics: FrameAnalytics | None) -> bool:
        try:
            conn = self._connection()
            with conn.transaction():
                cursor = conn.execute(INSERT_DETECTION, row)
                inserted = cursor.rowcount == 1
                if inserted:
                    conn.execute(COUNT_STORED, (row["stream_id"], row["bytes"], row["bytes"]))
                if inserted and analytics is not None:
                    self._insert_analytics(conn, analytics)
        except psycopg.errors.ForeignKeyViolation as err:
            raise PermanentStoreError(f"stream {row['stream_id']} has no row in streams") from err
        except (psycopg.DataError, psycopg.ProgrammingError, psycopg.IntegrityError) as err:
            raise PermanentStoreError(str(err)) from err
        except (psycopg.OperationalError, psycopg.InterfaceError):
            self._drop_connection()
            raise
        return inserted

    def _insert_analytics(self, conn: psycopg.Connection, analytics: FrameAnalytics) -> None:
        """The frame's events, their outbox messages and deliveries, and the shapes' figures."""
        for event in analytics.events:
            inserted = conn.execute(
                INSERT_EVENT,
                (
                    event.event_id, event.stream_id, event.frame_seq, event.kind.value, event.zone,
                    event.direction.value if event.direction else None, event.track_id, event.class_name,
                    event.confidence, event.dwell_s, event.occurred_at, event.s3_key,
                    event.cause.value if event.cause else None,
                ),
            ).fetchone()  # fmt: skip
            if inserted is None:
                continue  # stored already (cannot happen with a new row, but never twice)
            message = analytics_message(self._settings, event)
            conn.execute(INSERT_ONE, (message.topic, message.key, message.payload, message.dedupe_key))
            conn.execute(INSERT_DELIVERY, (inserted[0], event.stream_id))
            if self._settings.mqtt_enabled:
                conn.execute(INSERT_MQTT_DELIVERY, (inserted[0],))
        _write_figures(conn, analytics)

    def _connection(self) -> psycopg.Connection:
        if self._db is None or self._db.closed:
            self._db = psycopg.connect(
                self._settings.database_url.get_secret_value(), autocommit=True, connect_timeout=5
            )
        return self._db

    def _drop_connection(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            finally:
                self._db = None
