"""Every Prometheus metric of Lookout, defined once; each service imports the ones it updates.

The API serves them at ``/metrics``; each worker serves its process's registry on its own port
(``start_metrics_server``, ``Settings.metrics_port_*``). Per-stream series carry the ``stream_id``
label and are removed when the stream ends in that process (``forget_stream``), so the number of
series follows the running streams. Counts made in a per-stream child process (runner capture, ML
detection) are reported to the parent over the existing pipe and counted here by the parent.
"""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# --- per stream: runner ------------------------------------------------------------------------------

FRAMES_READ = Counter("lookout_frames_read_total", "Frames read from the camera", ["stream_id"])
FRAMES_PUBLISHED = Counter(
    "lookout_frames_published_total", "Sampled frames published to the frames topic", ["stream_id"]
)

# --- per stream: runner and ml -----------------------------------------------------------------------

FRAMES_DROPPED = Counter(
    "lookout_frames_dropped_total",
    "Frames dropped, oldest first, by a full per-stream queue: the runner's (Kafka slower than the "
    "camera) or ML's (the model slower than the frames)",
    ["service", "stream_id"],
)

# --- per stream: ml ----------------------------------------------------------------------------------

FRAMES_PROCESSED = Counter("lookout_frames_processed_total", "Frames run through the model", ["stream_id"])
FRAMES_SKIPPED = Counter(
    "lookout_frames_skipped_total",
    "Frames skipped by motion gating: nothing moved, no row (ml)",
    ["stream_id"],
)
FRAMES_NOT_STORED = Counter(
    "lookout_frames_not_stored_total",
    "Frames detected but not stored under the stream's store policy (e.g. empty, or unchanged under "
    "`changes`) (ml)",
    ["stream_id"],
)
ANALYTICS_EVENTS = Counter(
    "lookout_analytics_events_total",
    "Zone and line events stored (entered, left, dwell, crossed), per zone or line",
    ["stream_id", "zone", "kind"],
)
UNTRACKED_DETECTIONS = Counter(
    "lookout_tracker_unmatched_detections_total",
    "Detections above the confidence threshold that joined no track and were too unsure to start one",
    ["stream_id"],
)
DETECTIONS_STORED = Counter(
    "lookout_detections_stored_total", "Detection rows inserted (one per frame with objects)", ["stream_id"]
)
INFERENCE_SECONDS = Histogram(
    "lookout_inference_seconds",
    "Model inference time per frame",
    ["stream_id"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
CAPTURE_TO_ROW_SECONDS = Histogram(
    "lookout_capture_to_row_seconds",
    "From the frame's capture by the runner to its detection row in Postgres",
    ["stream_id"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)

# --- per stream: live figures of the heartbeats (runner and ml) ---------------------------------------

STREAM_FPS = Gauge(
    "lookout_stream_fps",
    "Frames per second over the last heartbeat interval: published (runner) or processed (ml)",
    ["service", "stream_id"],
)
NEWEST_FRAME_AGE_SECONDS = Gauge(
    "lookout_newest_frame_age_seconds",
    "From the capture of the newest frame published (runner) or processed (ml) to the heartbeat",
    ["service", "stream_id"],
)
CAMERA_RECONNECTS = Counter(
    "lookout_camera_reconnects_total", "Camera connections after the first (runner)", ["stream_id"]
)
CAMERA_CONNECTED = Gauge(
    "lookout_camera_connected",
    "1 while the stream's capture gets frames from its camera, 0 while connecting or reconnecting (runner)",
    ["stream_id"],
)
ML_QUEUE_DEPTH = Gauge("lookout_ml_queue_depth", "Frames waiting for the model (ml)", ["stream_id"])
ENGINE_LOST = Counter(
    "lookout_engine_lost_inferences_total",
    "Inferences in flight when the shared engine died (each retried on the restarted engine) (ml)",
    ["stream_id"],
)

# --- ml: the shared inference engines (one per model in use) ------------------------------------------

ENGINE_RESTARTS = Counter(
    "lookout_engine_restarts_total", "Shared inference engines restarted after they died (ml)", ["engine"]
)
ENGINE_STREAMS = Gauge(
    "lookout_engine_streams", "Streams' processes connected to the engine (ml)", ["engine"]
)
ENGINE_INFERENCES = Counter(
    "lookout_engine_inferences_total", "Frames the engine ran through the model (ml)", ["engine"]
)
ENGINE_BATCHES = Counter(
    "lookout_engine_batches_total",
    "Model runs of the engine: batches (PyTorch, ONNX Runtime) or async requests (OpenVINO) (ml)",
    ["engine"],
)

PER_STREAM = (
    FRAMES_READ,
    FRAMES_PUBLISHED,
    FRAMES_DROPPED,
    FRAMES_PROCESSED,
    FRAMES_SKIPPED,
    FRAMES_NOT_STORED,
    ANALYTICS_EVENTS,
    UNTRACKED_DETECTIONS,
    DETECTIONS_STORED,
    INFERENCE_SECONDS,
    CAPTURE_TO_ROW_SECONDS,
    STREAM_FPS,
    NEWEST_FRAME_AGE_SECONDS,
    CAMERA_RECONNECTS,
    CAMERA_CONNECTED,
    ML_QUEUE_DEPTH,
    ENGINE_LOST,
)

# --- Kafka consumers ---------------------------------------------------------------------------------

CONSUMER_LAG = Gauge(
    "lookout_consumer_lag",
    "Records behind the end of the topic, summed over this member's partitions (highwater - position)",
    ["group", "topic"],
)
BAD_MESSAGES = Counter(
    "lookout_bad_messages_total", "Malformed messages logged and skipped", ["service", "topic"]
)
DEAD_LETTERED = Counter(
    "lookout_dead_lettered_total", "Records copied to the dead-letter topic", ["service", "topic"]
)

# --- webhooks ----------------------------------------------------------------------------------------

WEBHOOK_ATTEMPTS = Counter(
    "lookout_webhook_attempts",
    "Webhook deliveries tried, by outcome: delivered, retry (failed, tried again later), dead",
    ["outcome"],
)
WEBHOOK_PENDING = Gauge("lookout_webhook_pending", "Webhook deliveries not yet delivered nor dead")

# --- MQTT sink ---------------------------------------------------------------------------------------

MQTT_CONNECTED = Gauge("lookout_mqtt_connected", "1 while lookout-mqtt is connected to its broker")
MQTT_PUBLISHED = Counter(
    "lookout_mqtt_published_total",
    "Messages published: event, state (retained topics and discovery)",
    ["what"],
)
MQTT_PENDING = Gauge("lookout_mqtt_pending", "Events queued for MQTT, not yet published")

# --- outbox relay ------------------------------------------------------------------------------------

OUTBOX_BACKLOG = Gauge("lookout_outbox_backlog", "Outbox rows not yet published (all relays)")
OUTBOX_PUBLISHED = Counter("lookout_outbox_published", "Outbox rows this relay published to Kafka")
OUTBOX_PUBLISH_FAILURES = Counter("lookout_outbox_publish_failures", "Outbox rows whose publish failed")

# --- state-manager bridge ----------------------------------------------------------------------------

BRIDGE_SIGNALLED = Counter(
    "lookout_bridge_events_signalled", "State events signalled to their lifecycle workflow"
)
BRIDGE_LATE_EVENTS = Counter(
    "lookout_bridge_events_after_end", "State events of a stream whose lifecycle had ended, dropped"
)
BRIDGE_SIGNAL_RETRIES = Counter(
    "lookout_bridge_signal_retries", "Signals retried because Temporal was unavailable"
)

# --- Temporal worker ---------------------------------------------------------------------------------

STATES_RECORDED = Counter(
    "lookout_states_recorded", "Lifecycle states written to Postgres by the workflow's activity", ["state"]
)

HEALTH_EVENTS = Counter(
    "lookout_health_events_total",
    "Health events stored (camera_offline, camera_online, service_restarted, stream_failed,"
    " stream_recovered) (temporal worker)",
    ["kind"],
)

# --- API ---------------------------------------------------------------------------------------------

# --- live views (api/live.py; workers/ml) ---------------------------------------------------------
LIVE_FRAMES_PUBLISHED = Counter(
    "lookout_live_frames_published_total", "Annotated frames ML published for live views"
)
LIVE_FRAMES_DROPPED = Counter(
    "lookout_live_frames_dropped_total",
    "Live frames dropped: ml (Kafka slower than the stream) or viewer (a viewer not keeping up)",
    ["where"],
)
for _where in ("ml", "viewer"):  # exported at 0 from the start: dashboards and alerts see them
    LIVE_FRAMES_DROPPED.labels(_where)
LIVE_VIEWERS = Gauge("lookout_live_viewers", "Live views open on this API instance")
LIVE_VIEWERS_STALLED = Counter(
    "lookout_live_viewers_stalled_total", "Live views ended because the viewer took nothing for live_stall_s"
)

API_STREAMS_STARTED = Counter("lookout_api_streams_started", "Streams accepted by POST /init")
API_INIT_REPLAYS = Counter("lookout_api_init_replays", "POST /init answered from an Idempotency-Key")
API_SHUTDOWNS_ACCEPTED = Counter("lookout_api_shutdowns_accepted", "Shutdowns accepted by POST /shutdown")


def forget_stream(stream_id: str) -> None:
    """Drop every per-stream series of ``stream_id`` from this process (the stream ended here)."""
    for metric in PER_STREAM:
        metric.remove_by_labels({"stream_id": stream_id})


def start_metrics_server(port: int, host: str = "127.0.0.1") -> WSGIServer | None:
    """Serve this process's metrics on ``host:port`` in a daemon thread; None when ``port`` is 0.

    A port already taken is logged, not raised: metrics are not worth a service that will not start.
    """
    if not port:
        return None
    try:
        server, _thread = start_http_server(port, addr=host)
    except OSError as err:
        log.error("metrics not served", extra={"host": host, "port": port, "error": repr(err)})
        return None
    log.info("metrics served", extra={"host": host, "port": port})
    return server


# --- storage (janitor) -------------------------------------------------------------------------------

STORAGE_TOTAL_BYTES = Gauge("lookout_storage_bytes", "Annotated frames kept, every stream together, in bytes")
STORAGE_BUDGET_BYTES = Gauge("lookout_storage_budget_bytes", "The store's byte budget (storage_budget_bytes)")
STORAGE_STREAM_BYTES = Gauge(
    "lookout_storage_stream_bytes", "A stream's annotated frames kept, in bytes", ["stream_id"]
)
STORAGE_DAYS_UNTIL_FULL = Gauge(
    "lookout_storage_days_until_full",
    "Days until the budget is reached at the recent rate (0: reached, the oldest go; -1: nothing stored lately)",
)
STORAGE_DELETED_FRAMES = Counter(
    "lookout_storage_deleted_frames_total",
    "Frames (row and object) deleted, by reason: age, stream_bytes, budget, stream_deleted",
    ["reason"],
)
STORAGE_DELETED_BYTES = Counter(
    "lookout_storage_deleted_bytes_total", "Bytes of frames deleted, by reason", ["reason"]
)
STORAGE_PENDING_DELETIONS = Gauge(
    "lookout_storage_pending_deletions", "Objects whose rows are deleted, still to delete from S3 (janitor)"
)
JANITOR_PASS_SECONDS = Histogram(
    "lookout_janitor_pass_seconds",
    "Duration of one janitor pass",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
