"""Where a stream process keeps its results: annotated JPEGs in S3, detection rows in Postgres.

Both writes retry with backoff while their server is down, so a brief outage delays the frame in
hand instead of losing it. Blocking on purpose: it runs inside the per-stream process.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

import psycopg
import urllib3
from minio.error import InvalidResponseError, S3Error, ServerError
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pydantic import ValidationError
from tenacity import retry_if_exception

from core.detections import DetectedObject
from core.messages import FrameHeaders
from core.retry import Stopped, retrying_blocking
from core.settings import Settings
from core.storage import create_s3_client, ensure_bucket
from core.streams import COLUMNS, StreamRow

log = logging.getLogger(__name__)

T = TypeVar("T")

INSERT_DETECTION = """
INSERT INTO detections (stream_id, frame_seq, capture_time, s3_key, width, height, objects)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (stream_id, frame_seq) DO NOTHING
"""


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

    def save(self, headers: FrameHeaders, jpeg: bytes, objects: list[DetectedObject]) -> bool:
        """Store one annotated frame; False when its row already existed (a redelivered frame).

        Retries each write until it succeeds; raises PermanentStoreError when a write cannot succeed.
        """
        key = frame_key(headers.stream_id, headers.frame_seq)
        context = {"stream_id": headers.stream_id, "frame_seq": headers.frame_seq}
        self._retry("s3 upload", lambda: self._put(key, jpeg), context)
        row = (
            headers.stream_id,
            headers.frame_seq,
            datetime.fromtimestamp(headers.capture_ts, UTC),
            key,
            headers.width,
            headers.height,
            Jsonb([o.model_dump(mode="json") for o in objects]),
        )
        return self._retry("detection insert", lambda: self._insert(row), context)

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

    def _insert(self, row: tuple[object, ...]) -> bool:
        try:
            cursor = self._connection().execute(INSERT_DETECTION, row)
        except psycopg.errors.ForeignKeyViolation as err:
            raise PermanentStoreError(f"stream {row[0]} has no row in streams") from err
        except (psycopg.DataError, psycopg.ProgrammingError, psycopg.IntegrityError) as err:
            raise PermanentStoreError(str(err)) from err
        except (psycopg.OperationalError, psycopg.InterfaceError):
            self._drop_connection()
            raise
        return cursor.rowcount == 1

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
