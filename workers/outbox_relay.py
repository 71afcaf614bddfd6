"""The outbox relay (lookout-outbox-relay): publishes the outbox's rows to Kafka, keyed by stream id.

It claims a batch of unsent rows with ``FOR UPDATE SKIP LOCKED``, publishes them and marks them sent
in the same transaction, so the row locks keep a second relay off them until they are marked: two
relays never publish a row twice unless a relay dies between publishing and committing (then the
row goes out again: delivery is at-least-once and every consumer is idempotent). A stream's rows go
out in order, also with several relays: a per-stream advisory lock gives each stream to one relay
at a time, and a row that fails holds back the later rows of its stream, so a ``stop`` never
overtakes its ``start``. A failed row stays unsent with ``attempts`` and ``last_error``; the relay
backs off while nothing goes out and retries. It wakes on ``LISTEN lookout_outbox`` and polls
slowly as a safety net. After every batch (and every failed attempt) it counts the unsent rows into
the ``lookout_outbox_backlog`` gauge, so a broker outage shows as a growing backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, UnknownTopicOrPartitionError
from tenacity import retry_if_exception_type

from core.db import POSTGRES_DOWN, run_on_pool
from core.kafka import close_client, create_producer, ensure_topics
from core.metrics import OUTBOX_BACKLOG, OUTBOX_PUBLISH_FAILURES, OUTBOX_PUBLISHED
from core.outbox import NOTIFY_CHANNEL
from core.retry import Stopped, retrying, wait_any
from core.settings import Settings
from core.timeouts import within
from workers.entrypoint import run_service

log = logging.getLogger(__name__)

# First key of the per-stream advisory locks ("look" in ASCII), apart from any other lock user.
STREAM_LOCK_SPACE = 0x6C6F6F6B
CONTENDED_RETRY_S = 0.5
STREAM_CANDIDATES_PER_ROW = 4  # streams looked at per batch row, so a second relay finds free ones
BACKLOG_QUERY_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class BatchResult:
    claimed: int
    sent: int
    failed: int
    contended: bool = False  # streams with unsent rows were held by another relay


class OutboxRelay:
    """Moves outbox rows to Kafka until ``run``'s stop event is set."""

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        *,
        batch_size: int = 100,
        poll_interval_s: float = 5.0,
        publish_timeout_s: float = 10.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._publish_timeout_s = publish_timeout_s
        self._max_backoff_s = max_backoff_s
        self._producer: AIOKafkaProducer | None = None
        self._wake = asyncio.Event()
        self.listening = asyncio.Event()  # set while the LISTEN connection is up (tests wait on it)
        self.sent_total = 0  # rows this relay published

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set; Kafka or Postgres being down only delays the rows."""
        listener = asyncio.create_task(self._listen(stop), name="outbox-listen")
        log.info("outbox relay started", extra={"batch_size": self._batch_size})
        try:
            while not stop.is_set():
                # back off only while nothing goes out: a single refused row must not slow the others
                async for attempt in retrying(
                    self._settings, "outbox relay batch", stop_event=stop, max_s=self._max_backoff_s
                ):
                    with attempt:
                        result = await self._relay_and_measure()
                if result.contended:  # no notification tells when the other relay is done with them
                    await wait_any(stop, self._wake, min(CONTENDED_RETRY_S, self._poll_interval_s))
                elif result.claimed < self._batch_size:
                    await wait_any(stop, self._wake, self._poll_interval_s)
        except Stopped:
            pass
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            await self._close_producer()
            log.info("outbox relay stopped")

    async def _relay_and_measure(self) -> BatchResult:
        """One batch, then the backlog gauge; raises when the batch failed or sent nothing it claimed."""
        self._wake.clear()  # before claiming: a row inserted meanwhile wakes the next wait
        try:
            result = await self.relay_batch()
        finally:
            await self.measure_backlog()
        if result.failed and not result.sent:
            raise _NothingWentOut(f"{result.failed} claimed row(s) failed to publish")
        return result

    async def relay_batch(self) -> BatchResult:
        """Claim up to one batch of unsent rows, publish them, mark what went out; one transaction."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows, contended = await self._claim(conn)
            if not rows:
                return BatchResult(claimed=0, sent=0, failed=0, contended=contended)
            try:
                producer = await self._started_producer()
            except Exception as err:  # broker unreachable: the rows stay, with the reason
                errors: list[BaseException | None] = [err] * len(rows)
            else:
                errors = await self._publish(producer, rows)
            sent = [row["id"] for row, error in zip(rows, errors, strict=True) if error is None]
            failed = [(row, error) for row, error in zip(rows, errors, strict=True) if error is not None]
            if sent:
                await conn.execute(
                    "UPDATE outbox SET sent_at = now(), attempts = attempts + 1 WHERE id = ANY($1::bigint[])",
                    sent,
                )
            if failed:
                await conn.executemany(
                    "UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = $1",
                    [(row["id"], _describe(error)) for row, error in failed],
                )
        OUTBOX_PUBLISHED.inc(len(sent))
        self.sent_total += len(sent)
        OUTBOX_PUBLISH_FAILURES.inc(len(failed))
        if failed:
            log.warning(
                "outbox publish failed",
                extra={
                    "count": len(failed),
                    "stream_ids": sorted({row["key"] for row, _error in failed})[:50],
                    "error": _describe(failed[0][1]),
                },
            )
        if sent:
            stream_ids = sorted(
                {row["key"] for row, error in zip(rows, errors, strict=True) if error is None}
            )
            log.info("outbox rows published", extra={"count": len(sent), "stream_ids": stream_ids[:50]})
        return BatchResult(claimed=len(rows), sent=len(sent), failed=len(failed), contended=contended)

    async def measure_backlog(self) -> int | None:
        """Set ``lookout_outbox_backlog`` to the number of unsent rows; None when Postgres did not answer."""
        try:
            unsent: int = await self._pool.fetchval(
                "SELECT count(*) FROM outbox WHERE sent_at IS NULL", timeout=BACKLOG_QUERY_TIMEOUT_S
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as err:
            log.debug("outbox backlog not measured", extra={"error": repr(err)})
            return None
        OUTBOX_BACKLOG.set(unsent)
        return unsent

    async def _claim(self, conn: asyncpg.Connection) -> tuple[list[asyncpg.Record], bool]:
        """Lock the streams with the oldest unsent rows that no other relay holds, then claim their rows.

        The per-stream advisory lock gives a stream to one relay at a time, so its rows go out in order
        while other relays take other streams; the row locks and the advisory locks end with the
        transaction. Also says whether another relay held some of those streams.
        """
        oldest_streams = await conn.fetch(
            "SELECT key FROM outbox WHERE sent_at IS NULL GROUP BY key ORDER BY min(id) LIMIT $1",
            self._batch_size * STREAM_CANDIDATES_PER_ROW,
        )
        if not oldest_streams:
            return [], False
        # The filter runs on the candidates as the LIMIT pulls them, so at most a batch of streams is
        # locked, skipping those another relay holds.
        mine = await conn.fetchval(
            """
            SELECT coalesce(array_agg(k), '{}') FROM (
                SELECT k FROM unnest($1::text[]) AS k
                 WHERE pg_try_advisory_xact_lock($2, hashtext(k))
                 LIMIT $3
            ) AS locked
            """,
            [row["key"] for row in oldest_streams],
            STREAM_LOCK_SPACE,
            self._batch_size,
        )
        contended = len(mine) < min(len(oldest_streams), self._batch_size)
        if not mine:
            return [], contended
        rows: list[asyncpg.Record] = await conn.fetch(
            """
            SELECT id, topic, key, payload FROM outbox
             WHERE sent_at IS NULL AND key = ANY($1::text[])
             ORDER BY id
             LIMIT $2
               FOR UPDATE SKIP LOCKED
            """,
            mine,
            self._batch_size,
        )
        return rows, contended

    async def _publish(
        self, producer: AIOKafkaProducer, rows: list[asyncpg.Record]
    ) -> list[BaseException | None]:
        """Publish the rows, each stream's in order and streams side by side; None where a row went out.

        After a failure the stream's later rows are not sent, so a stream's messages never overtake
        each other (a ``stop`` never arrives before its ``start``).
        """
        results: dict[int, BaseException | None] = {}
        by_stream: dict[str, list[asyncpg.Record]] = {}
        # a row for a topic the broker does not have fails at once: waiting for it to appear would
        # hold up the whole batch for the publish timeout, every batch (topics are never auto-created)
        try:
            known = (await within(producer.client.fetch_all_metadata(), self._publish_timeout_s)).topics()
        except (KafkaError, TimeoutError) as err:  # the broker is away: every row waits for the next try
            return [err] * len(rows)
        for row in rows:
            by_stream.setdefault(row["key"], []).append(row)
            if row["topic"] not in known:
                results[row["id"]] = UnknownTopicOrPartitionError(f"topic {row['topic']!r} does not exist")

        async def publish_in_order(stream_rows: list[asyncpg.Record]) -> None:
            for row in stream_rows:
                if results.get(row["id"]) is not None:
                    return  # its topic does not exist: it holds back the stream's later rows
                try:
                    await producer.send_and_wait(row["topic"], bytes(row["payload"]), key=row["key"].encode())
                except Exception as err:
                    results[row["id"]] = err
                    return
                results[row["id"]] = None

        try:
            await within(
                asyncio.gather(*(publish_in_order(stream_rows) for stream_rows in by_stream.values())),
                self._publish_timeout_s,
            )
        except TimeoutError:
            # what the producer still holds may go out later: at-least-once, consumers dedupe
            await self._close_producer()
        timed_out = TimeoutError(f"no acknowledgement within {self._publish_timeout_s:g}s")
        held_back = _HeldBack("not sent: an earlier message of the stream was not published")
        for stream_rows in by_stream.values():
            failed = False
            for row in stream_rows:
                result = held_back if failed else results.get(row["id"], timed_out)
                results[row["id"]] = result
                failed = result is not None
        return [results[row["id"]] for row in rows]

    async def _started_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = create_producer(
                self._settings,
                client_id="lookout-outbox-relay",
                request_timeout_ms=int(self._publish_timeout_s * 1000 * 0.8),
            )
            try:
                await producer.start()
                # the events topic is only written through the outbox: the relay makes it
                await ensure_topics(self._settings, [self._settings.topic_events], reconcile=False)
            except BaseException:
                with contextlib.suppress(Exception):
                    await producer.stop()
                raise
            self._producer = producer
        return self._producer

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await close_client(producer, "outbox relay producer", timeout_s=5)

    async def _listen(self, stop: asyncio.Event) -> None:
        """Keep a LISTEN connection open and wake the relay on every notification; reconnect on loss."""
        with contextlib.suppress(Stopped):
            while not stop.is_set():  # a connection lost after it was up starts a fresh backoff
                async for attempt in retrying(
                    self._settings,
                    "outbox listen connection",
                    stop_event=stop,
                    retry=retry_if_exception_type(POSTGRES_DOWN),
                    max_s=self._max_backoff_s,
                ):
                    with attempt:
                        await self._listen_until_lost(stop)
                await wait_any(stop, None, self._settings.retry_initial_s)  # lost: the first wait

    async def _listen_until_lost(self, stop: asyncio.Event) -> None:
        """Listen until stopped or the connection is lost; raises when it cannot connect."""
        conn = await asyncpg.connect(self._settings.database_url.get_secret_value(), timeout=10)
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(NOTIFY_CHANNEL, lambda *_args: self._wake.set())
            self.listening.set()
            self._wake.set()  # rows inserted while nobody listened
            while not stop.is_set() and not lost.is_set() and not conn.is_closed():
                await wait_any(stop, lost, self._poll_interval_s)
            if not stop.is_set():
                log.warning("outbox listen connection lost; reconnecting")
        finally:
            self.listening.clear()
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)


class _NothingWentOut(Exception):
    """A batch whose claimed rows all failed to publish: the relay backs off before the next."""


class _HeldBack(Exception):
    """A row kept back because an earlier row of its stream failed in the same batch."""


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run one relay until ``stop`` is set."""
    await run_on_pool(settings, stop, OutboxRelay)


def main() -> None:
    """Console script ``lookout-outbox-relay``."""
    run_service("outbox-relay", serve, metrics_port=lambda s: s.metrics_port_relay)
