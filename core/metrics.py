"""Prometheus metrics shared by Lookout's services (one definition, every service imports it).

The API serves them at ``/metrics``; each worker serves its own registry on its metrics port
(``start_metrics_server``). Per-stream series carry the ``stream_id`` label.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

FRAMES_READ = Counter("lookout_frames_read_total", "Frames read from the camera", ["stream_id"])
FRAMES_PUBLISHED = Counter("lookout_frames_published_total", "Frames published to Kafka", ["stream_id"])
FRAMES_PROCESSED = Counter("lookout_frames_processed_total", "Frames run through the model", ["stream_id"])
FRAMES_DROPPED = Counter(
    "lookout_frames_dropped_total", "Frames dropped by a full per-stream queue (oldest first)", ["stream_id"]
)
DETECTIONS_STORED = Counter("lookout_detections_stored_total", "Detection rows inserted", ["stream_id"])
INFERENCE_SECONDS = Histogram(
    "lookout_inference_seconds",
    "Model inference time per frame",
    ["stream_id"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
CAPTURE_TO_ROW_SECONDS = Histogram(
    "lookout_capture_to_row_seconds",
    "From the frame's capture to its detection row in Postgres",
    ["stream_id"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
OUTBOX_BACKLOG = Gauge("lookout_outbox_backlog", "Outbox rows not yet published")
CONSUMER_LAG = Gauge("lookout_consumer_lag", "Records behind the partition's end", ["group", "topic"])
BAD_MESSAGES = Counter(
    "lookout_bad_messages_total", "Malformed messages logged and skipped", ["service", "topic"]
)
SERVICE_RESTARTS = Counter("lookout_service_restarts_total", "Supervised service restarts", ["service"])


def start_metrics_server(port: int) -> None:
    """Serve this process's metrics on ``127.0.0.1:port`` (0 disables it)."""
    if port:
        start_http_server(port, addr="127.0.0.1")
        log.info("metrics served", extra={"port": port})
