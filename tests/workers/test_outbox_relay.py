"""The outbox relay against the real Postgres and broker: wake-up, ordering, two relays, broker down."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from core.kafka import ensure_topics
from core.outbox import OutboxMessage, enqueue
from core.settings import Settings
from core.timeouts import within
from tests.observing import consume, eventually
from tests.running_services import RestartableServer, private_broker, running_relay

pytestmark = pytest.mark.integration


@pytest.fixture
async def topic(settings: Settings) -> str:
    name = f"test.relay.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [name], partitions=3)
    return name


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[RestartableServer]:
    server = private_broker(tmp_path)
    await server.start_async()
    try:
        yield server
    finally:
        await server.stop_async()


async def insert_rows(
    db_pool: asyncpg.Pool, topic: str, count: int, *, streams: int = 3
) -> list[OutboxMessage]:
    """``count`` messages for ``topic`` over ``streams`` stream ids, in one transaction like the API's."""
    stream_ids = [str(uuid.uuid4()) for _ in range(streams)]
    messages = [
        OutboxMessage(
            topic=topic,
            key=stream_ids[i % streams],
            payload=f"message {i}".encode(),
            dedupe_key=f"test:{uuid.uuid4()}",
        )
        for i in range(count)
    ]
    async with db_pool.acquire() as conn, conn.transaction():
        assert await enqueue(conn, messages) == count
    return messages


async def all_sent(db_pool: asyncpg.Pool, topic: str) -> bool:
    return not await db_pool.fetchval(
        "SELECT count(*) FROM outbox WHERE topic = $1 AND sent_at IS NULL", topic
    )


async def test_relay_publishes_rows_keyed_by_stream_id_in_order_and_marks_them_sent(
    settings: Settings, db_pool: asyncpg.Pool, topic: str
) -> None:
    messages = await insert_rows(db_pool, topic, 30)

    async with running_relay(settings, batch_size=7):
        records = await consume(settings, topic, until=lambda got: len(got) >= 30, linger_s=0.5)
        await eventually(lambda: all_sent(db_pool, topic))

    assert len(records) == 30
    for key in {m.key for m in messages}:
        expected = [m.payload for m in messages if m.key == key]
        assert [r.value for r in records if r.key == key.encode()] == expected, "order within a stream"
    rows = await db_pool.fetch("SELECT sent_at, attempts, last_error FROM outbox WHERE topic = $1", topic)
    assert all(r["sent_at"] is not None and r["attempts"] == 1 and r["last_error"] is None for r in rows)


async def test_relay_wakes_on_notify_long_before_its_poll(
    settings: Settings, db_pool: asyncpg.Pool, topic: str
) -> None:
    async with running_relay(settings, poll_interval_s=120):
        await asyncio.sleep(0.5)  # idle, waiting on LISTEN
        started = time.monotonic()
        await insert_rows(db_pool, topic, 1)
        await consume(settings, topic, until=lambda got: len(got) == 1)
        waited = time.monotonic() - started

    assert waited < 10, f"published after {waited:.1f}s: the notification did not wake the relay"


async def test_relay_listens_again_after_its_listen_connection_is_killed(
    settings: Settings, db_pool: asyncpg.Pool, topic: str
) -> None:
    async with running_relay(settings, poll_interval_s=120) as relay:
        await asyncio.sleep(0.3)
        killed = await db_pool.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE query ILIKE 'LISTEN%lookout_outbox%' AND datname = current_database()"
        )
        assert killed >= 1
        await eventually(lambda: not relay.listening.is_set(), timeout_s=5, interval_s=0.01)
        await within(relay.listening.wait(), 10)
        await asyncio.sleep(0.5)  # idle again, the catch-up pass done

        await insert_rows(db_pool, topic, 1)
        await consume(settings, topic, until=lambda got: len(got) == 1, timeout_s=10)


async def test_two_relays_at_once_publish_every_row_exactly_once_and_each_stream_in_order(
    settings: Settings, db_pool: asyncpg.Pool, topic: str
) -> None:
    async with (
        running_relay(settings, batch_size=10) as first,
        running_relay(settings, batch_size=10) as second,
    ):
        await asyncio.sleep(0.5)  # both idle on LISTEN: one notification wakes both
        messages = await insert_rows(db_pool, topic, 400, streams=40)
        records = await consume(settings, topic, until=lambda got: len(got) >= 400, linger_s=2.0)
        await eventually(lambda: all_sent(db_pool, topic))

    payloads = [r.value for r in records]
    assert len(payloads) == 400, f"{len(payloads) - len(set(payloads))} duplicates"
    assert set(payloads) == {m.payload for m in messages}
    assert first.sent_total > 0 and second.sent_total > 0, "both relays should have claimed batches"
    for key in {m.key for m in messages}:
        expected = [m.payload for m in messages if m.key == key]
        assert [r.value for r in records if r.key == key.encode()] == expected, "order within a stream"


async def test_relay_keeps_rows_while_the_broker_is_down_and_publishes_them_once_it_is_back(
    settings: Settings, db_pool: asyncpg.Pool, broker: RestartableServer
) -> None:
    on_private = settings.model_copy(update={"kafka_bootstrap": broker.address})
    topic = f"test.relay.down.{uuid.uuid4().hex[:8]}"
    await ensure_topics(on_private, [topic], partitions=1)

    async with running_relay(on_private, publish_timeout_s=1.5, max_backoff_s=1.0, poll_interval_s=1.0):
        await broker.stop_async()
        messages = await insert_rows(db_pool, topic, 5, streams=1)

        async def failed_and_kept() -> bool:
            rows = await db_pool.fetch(
                "SELECT sent_at, attempts, last_error FROM outbox WHERE topic = $1", topic
            )
            return all(r["sent_at"] is None and r["attempts"] >= 2 and r["last_error"] for r in rows)

        await eventually(failed_and_kept, timeout_s=30)
        await broker.start_async()  # its log is on disk: the topic is still there

        await eventually(lambda: all_sent(db_pool, topic), timeout_s=30)

    records = await consume(on_private, topic, until=lambda got: len(got) >= 5, linger_s=0.5)
    assert [r.value for r in records] == [m.payload for m in messages]


async def test_a_row_the_broker_refuses_holds_back_its_streams_later_rows_but_no_other_stream(
    settings: Settings, db_pool: asyncpg.Pool, topic: str
) -> None:
    small_requests = settings.model_copy(update={"kafka_max_request_size": 2000})
    blocked, free = str(uuid.uuid4()), str(uuid.uuid4())
    rows = [
        OutboxMessage(topic, blocked, b"x" * 5000, f"test:{uuid.uuid4()}"),  # over the request size
        OutboxMessage(topic, blocked, b"after the refused one", f"test:{uuid.uuid4()}"),
        OutboxMessage(topic, free, b"another stream", f"test:{uuid.uuid4()}"),
    ]
    async with db_pool.acquire() as conn:
        await enqueue(conn, rows)

    async with running_relay(small_requests, max_backoff_s=0.5):
        records = await consume(settings, topic, until=lambda got: len(got) >= 1, linger_s=1.0)

        async def both_kept() -> bool:
            kept = await db_pool.fetch(
                "SELECT payload, last_error FROM outbox WHERE topic = $1 AND sent_at IS NULL ORDER BY id",
                topic,
            )
            return [bytes(r["payload"])[:5] for r in kept if r["last_error"]] == [b"xxxxx", b"after"]

        await eventually(both_kept)

    assert [r.value for r in records] == [b"another stream"]
    errors = await db_pool.fetch(
        "SELECT last_error FROM outbox WHERE topic = $1 AND sent_at IS NULL ORDER BY id", topic
    )
    assert "MessageSizeTooLarge" in errors[0]["last_error"]
    assert "earlier message of the stream" in errors[1]["last_error"]
    await db_pool.execute(
        "UPDATE outbox SET sent_at = now() WHERE topic = $1", topic
    )  # leave no poison behind


async def test_a_row_for_a_topic_that_does_not_exist_holds_up_no_other_stream(
    settings: Settings, db_pool: asyncpg.Pool, topic: str
) -> None:
    """Topics are never created by a first use: such a row fails at once, with the reason, and the
    rows of other streams go out without waiting for it (it used to stall every batch)."""
    missing = f"test.relay.missing.{uuid.uuid4().hex[:8]}"
    lost = await insert_rows(db_pool, missing, 1, streams=1)
    try:
        messages = await insert_rows(db_pool, topic, 10)
        async with running_relay(settings, publish_timeout_s=10.0, max_backoff_s=1.0):
            started = time.monotonic()
            await eventually(lambda: all_sent(db_pool, topic), timeout_s=30)
            took = time.monotonic() - started
            records = await consume(settings, topic, until=lambda got: len(got) >= 10, linger_s=0.5)
            error = await db_pool.fetchval("SELECT last_error FROM outbox WHERE topic = $1", missing)
        assert {r.value for r in records} == {m.payload for m in messages}
        assert took < 5.0, f"the other streams' rows waited {took:.1f}s"
        assert error is not None and "does not exist" in error
    finally:
        await db_pool.execute("DELETE FROM outbox WHERE topic = $1", missing)
    assert lost
