"""``lookout-webhooks``: delivers every event of a stream with a ``webhook_url``, at least once.

The detection process queues a row in ``webhook_deliveries`` with each zone or line event, and the
lifecycle's activity with each health event, in the event's own transaction, so a delivery is as
durable as the event. This worker claims due rows (``FOR UPDATE
SKIP LOCKED``: several instances share the work), POSTs each event as JSON, signed, and marks it
``delivered`` on a 2xx answer. Anything else is tried again after a growing delay
(``webhook_retry_first_s`` doubling up to ``webhook_retry_max_s``); after ``webhook_max_attempts``
the row turns ``dead``, the dead-letter record, with the last error. Detection never waits for it.

The signature: ``X-Lookout-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` keyed with
the stream's webhook secret (shown once when the stream got its ``webhook_url``). A receiver
recomputes it and may refuse a ``t`` too old. ``X-Lookout-Event-Id`` is the event's stable id: a
receiver dedupes on it, since a delivery may come twice (at least once).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from typing import Any

import asyncpg
import httpx

from core.db import POSTGRES_DOWN, run_on_pool
from core.health_events import EVENT_COLUMNS, stored_event
from core.metrics import WEBHOOK_ATTEMPTS, WEBHOOK_PENDING
from core.retry import wait_any
from core.sealing import UrlSealer
from core.settings import Settings
from workers.entrypoint import run_service

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Lookout-Signature"
LEASE_TIMEOUTS = 3  # a claimed row is not claimed again for this many request timeouts (its worker
# may have died): a worker killed mid-delivery delays its rows by that much, never loses them

CLAIM = """
UPDATE webhook_deliveries d
   SET next_attempt_at = now() + make_interval(secs => $2)
  FROM (SELECT id FROM webhook_deliveries
         WHERE status = 'pending' AND next_attempt_at <= now()
         ORDER BY next_attempt_at, id
         LIMIT $1
           FOR UPDATE SKIP LOCKED) due,
       events e, streams s
 WHERE d.id = due.id AND e.id = d.event_pk AND s.id = d.stream_id
RETURNING d.id, d.attempts, s.options->>'webhook_url' AS url, s.webhook_secret, {event_columns}
""".format(event_columns=", ".join(f"e.{name.strip()}" for name in EVENT_COLUMNS.split(",")))


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The value of ``X-Lookout-Signature`` for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, body: bytes, header: str, *, max_age_s: float = 300.0) -> bool:
    """Whether ``header`` is a valid signature of ``body`` made less than ``max_age_s`` ago (what a
    receiver does; the tests use it)."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > max_age_s:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), header)


def retry_delay_s(settings: Settings, attempts: int) -> float:
    """The wait before attempt ``attempts + 1``: doubling from the first delay, capped."""
    return float(
        min(settings.webhook_retry_max_s, settings.webhook_retry_first_s * 2 ** max(0, attempts - 1))
    )


class WebhookDeliverer:
    """Claims due deliveries and sends them, ``webhook_concurrency`` at a time."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.pool = pool
        self._sealer = UrlSealer(settings)
        self._client = httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False)

    async def run(self, stop: asyncio.Event) -> None:
        log.info("webhook deliverer started")
        try:
            while not stop.is_set():
                try:
                    sent = await self.deliver_due()
                except POSTGRES_DOWN as err:
                    log.warning("postgres unavailable, deliveries wait", extra={"error": str(err)})
                    sent = 0
                    await wait_any(stop, None, self.settings.retry_max_s)
                if not sent:
                    await wait_any(stop, None, self.settings.webhook_poll_s)
        finally:
            await self._client.aclose()

    async def deliver_due(self) -> int:
        """Send the deliveries due now; how many were tried."""
        lease_s = LEASE_TIMEOUTS * self.settings.webhook_timeout_s
        rows = await self.pool.fetch(CLAIM, self.settings.webhook_concurrency, lease_s)
        if rows:
            await asyncio.gather(*(self._deliver(row) for row in rows))
        WEBHOOK_PENDING.set(
            await self.pool.fetchval("SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'")
        )
        return len(rows)

    async def _deliver(self, row: asyncpg.Record) -> None:
        attempt = row["attempts"] + 1
        context: dict[str, Any] = {
            "stream_id": str(row["stream_id"]),
            "event_id": row["event_id"],
            "attempt": attempt,
        }
        error = None
        if row["url"] is None or row["webhook_secret"] is None:
            error = "the stream has no webhook_url any more"
        else:
            event = stored_event(row)
            body = event.model_dump_json().encode()
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "lookout-webhooks",
                "X-Lookout-Event-Id": event.event_id,
                SIGNATURE_HEADER: sign(self._sealer.open(row["webhook_secret"]), body, int(time.time())),
            }
            try:
                response = await self._client.post(row["url"], content=body, headers=headers)
                if not 200 <= response.status_code < 300:
                    error = f"HTTP {response.status_code}"
            except httpx.HTTPError as err:
                error = f"{type(err).__name__}: {err}"[:300]
        if error is None:
            await self.pool.execute(
                "UPDATE webhook_deliveries SET status = 'delivered', attempts = $2, delivered_at = now(),"
                " last_error = NULL WHERE id = $1",
                row["id"],
                attempt,
            )
            WEBHOOK_ATTEMPTS.labels("delivered").inc()
            log.info("webhook delivered", extra=context)
        elif attempt >= self.settings.webhook_max_attempts:
            await self.pool.execute(
                "UPDATE webhook_deliveries SET status = 'dead', attempts = $2, last_error = $3 WHERE id = $1",
                row["id"],
                attempt,
                error,
            )
            WEBHOOK_ATTEMPTS.labels("dead").inc()
            log.error("webhook dead-lettered after its last attempt", extra={**context, "error": error})
        else:
            delay = retry_delay_s(self.settings, attempt)
            await self.pool.execute(
                "UPDATE webhook_deliveries SET attempts = $2, last_error = $3,"
                " next_attempt_at = now() + make_interval(secs => $4) WHERE id = $1",
                row["id"],
                attempt,
                error,
                delay,
            )
            WEBHOOK_ATTEMPTS.labels("retry").inc()
            log.warning(
                "webhook failed, tried again later", extra={**context, "error": error, "retry_in_s": delay}
            )


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Deliver webhooks until ``stop`` is set."""
    await run_on_pool(settings, stop, WebhookDeliverer)


def main() -> None:
    """Console script ``lookout-webhooks``."""
    run_service("webhooks", serve, metrics_port=lambda s: s.metrics_port_webhooks)
