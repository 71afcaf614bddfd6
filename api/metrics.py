"""Prometheus metrics of the API, served at ``/metrics``."""

from __future__ import annotations

from prometheus_client import Counter

STREAMS_STARTED = Counter("lookout_api_streams_started", "Streams accepted by POST /init")
STREAMS_REPLAYED = Counter("lookout_api_init_replays", "POST /init answered from an Idempotency-Key")
SHUTDOWNS_ACCEPTED = Counter("lookout_api_shutdowns_accepted", "Shutdowns accepted by POST /shutdown")
