"""One retry policy for every loop that waits for a server to come back (tenacity).

Exponential backoff from ``LOOKOUT_RETRY_INITIAL_S``, doubling up to ``LOOKOUT_RETRY_MAX_S``, with
random jitter so that services restarted together do not retry in step. Long-running services
retry until they are told to stop: ``stop_event`` ends the wait at once and the retrying with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from aiokafka.errors import KafkaError
from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception_type, stop_never
from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base, wait_exponential_jitter

from core.settings import Settings
from core.timeouts import within

log = logging.getLogger(__name__)


# What a Kafka client raises while the broker is down or restarting.
KAFKA_DOWN = retry_if_exception_type(KafkaError)


class Stopped(Exception):
    """The service was asked to stop while it waited to retry."""


async def wait_any(stop: asyncio.Event, other: asyncio.Event | None, timeout_s: float) -> None:
    """Sleep until ``stop`` or ``other`` is set, or ``timeout_s`` has passed."""
    waiters = [asyncio.create_task(stop.wait())]
    if other is not None:
        waiters.append(asyncio.create_task(other.wait()))
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def delays(settings: Settings, **policy: float) -> Iterator[float]:
    """The policy's successive waits, for a loop that waits between rounds rather than retrying a
    call (a reconnect loop, a restart loop); a fresh iterator starts from the first wait again."""
    wait = backoff(settings, **policy)
    state = RetryCallState(retry_object=Retrying(), fn=None, args=(), kwargs={})
    while True:
        yield wait(state)
        state.attempt_number += 1


def backoff(
    settings: Settings,
    *,
    initial_s: float | None = None,
    max_s: float | None = None,
    jitter_s: float | None = None,
) -> wait_base:
    """The policy's waits: ``initial_s`` (default the setting), doubling, at most ``max_s``, each
    plus a random jitter of up to ``jitter_s`` (default ``initial_s``)."""
    first = settings.retry_initial_s if initial_s is None else initial_s
    return wait_exponential_jitter(
        multiplier=first,
        max=settings.retry_max_s if max_s is None else max_s,
        jitter=first if jitter_s is None else jitter_s,
    )


class _stop_event_set(stop_base):
    def __init__(self, event: asyncio.Event) -> None:
        self._event = event

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._event.is_set()


def _log_retry(what: str, context: dict[str, Any]) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning(
            f"{what} failed, retrying",
            extra={
                **context,
                "attempt": state.attempt_number,
                "retry_in_s": round(delay, 2),
                "error": repr(error),
            },
        )

    return before_sleep


def retrying(
    settings: Settings,
    what: str,
    *,
    stop_event: asyncio.Event | None = None,
    retry: retry_base | None = None,
    context: dict[str, Any] | None = None,
    **policy: float,
) -> AsyncRetrying:
    """Retry an async block with the policy until it succeeds or ``stop_event`` is set (then the
    last error is raised as ``Stopped``); each failure logged as ``"<what> failed, retrying"``.

        async for attempt in retrying(settings, "kafka start", stop_event=stop):
            with attempt:
                await producer.start()
    """

    async def sleep(seconds: float) -> None:
        if stop_event is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await within(stop_event.wait(), seconds)

    def stopped(state: RetryCallState) -> Any:
        error = state.outcome.exception() if state.outcome is not None else None
        raise Stopped(what) from error

    return AsyncRetrying(
        wait=backoff(settings, **policy),
        stop=_stop_event_set(stop_event) if stop_event is not None else stop_never,
        retry=retry or retry_if_exception_type(Exception),
        sleep=sleep,
        before_sleep=_log_retry(what, context or {}),
        retry_error_callback=stopped,
        reraise=False,
    )


def retrying_blocking(
    settings: Settings,
    what: str,
    *,
    retry: retry_base,
    give_up: Callable[[], bool],
    context: dict[str, Any] | None = None,
    **policy: float,
) -> Retrying:
    """The same policy for blocking code: retries while ``retry`` accepts the error, until
    ``give_up()`` says so (then ``Stopped``)."""

    def stopped(state: RetryCallState) -> Any:
        error = state.outcome.exception() if state.outcome is not None else None
        raise Stopped(what) from error

    class _give_up(stop_base):
        def __call__(self, retry_state: RetryCallState) -> bool:
            return give_up()

    return Retrying(
        wait=backoff(settings, **policy),
        stop=_give_up(),
        retry=retry,
        before_sleep=_log_retry(what, context or {}),
        retry_error_callback=stopped,
        reraise=False,
    )
