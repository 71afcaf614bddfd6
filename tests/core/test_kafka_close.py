"""``close_client``: a service that stops never hangs on a Kafka client's stop, nor fails on it."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from aiokafka.errors import KafkaConnectionError

from core.kafka import close_client


class FrozenClient:
    """Stands in for a consumer whose stop waits for ever (aiokafka #773)."""

    def __init__(self) -> None:
        self.cancelled = False

    async def stop(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


class FailingClient:
    async def stop(self) -> None:
        raise KafkaConnectionError("broker gone")


async def test_a_frozen_stop_is_abandoned_after_the_timeout_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    frozen = FrozenClient()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="core.kafka"):
        await close_client(frozen, "test consumer", timeout_s=0.2)  # type: ignore[arg-type]
    assert 0.2 <= time.monotonic() - started < 2
    assert frozen.cancelled
    assert [r.getMessage() for r in caplog.records] == ["kafka client did not stop in time, abandoned"]


async def test_a_failing_stop_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="core.kafka"):
        await close_client(FailingClient(), "test producer")  # type: ignore[arg-type]
    assert [r.getMessage() for r in caplog.records] == ["kafka client stop failed"]
