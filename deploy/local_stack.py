"""The embedded local stack: every infrastructure part of Lookout as a real server on 127.0.0.1.

``up`` starts what is not running yet (pid files under ``<data_dir>/run``), ``down`` stops only what
``up`` started, ``status`` reports each part's address and health. Data and logs live under the one
git-ignored ``data_dir``. The addresses in use are written to ``<data_dir>/stack.env``, which the
settings read, so services started afterwards find the stack.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from core.db import ensure_database, migrate
from core.kafka import ensure_topics, load_partition_logs
from core.redact import redact_url
from core.settings import Settings
from core.storage import create_s3_client, ensure_bucket
from core.temporal import SEARCH_ATTRIBUTES
from deploy import servers

log = logging.getLogger(__name__)

KAFKA_BUCKET = "lookout-kafka"
# Measured here: with 50 ms fetch waits, every consumer's polling makes Tansu read the S3 gateway so
# often that produces stall and a 5 fps stream stops flowing within a minute; at 500 ms a stream
# runs steadily at its rate. A memory broker (the tests') or Apache Kafka keeps the 50 ms default.
S3_BROKER_FETCH_MAX_WAIT_MS = 500


@dataclass
class PartStatus:
    name: str
    address: str
    healthy: bool
    pid: int | None
    note: str


class LocalStack:
    """Starts, checks and stops the parts of the embedded stack for one ``Settings``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.run_dir = self.data_dir / "run"

    # --- the parts ---------------------------------------------------------------------------

    def _private_postgres(self) -> servers.ServerSpec:
        return servers.postgres_cluster(self.data_dir / "postgres", self.settings.stack_pg_port)

    def _specs(self) -> list[servers.ServerSpec]:
        s = self.settings
        s3_port = s.stack_s3_port
        return [
            servers.s3_gateway(
                self.data_dir / "s3", s3_port, s.s3_access_key, s.s3_secret_key.get_secret_value()
            ),
            servers.kafka_broker(
                self.data_dir / "logs",
                s.stack_kafka_port,
                storage=f"s3://{KAFKA_BUCKET}/",
                s3_endpoint=f"http://127.0.0.1:{s3_port}",
                access_key=s.s3_access_key,
                secret_key=s.s3_secret_key.get_secret_value(),
            ),
            servers.temporal_dev_server(
                self.data_dir / "temporal", s.stack_temporal_port, s.stack_temporal_ui_port, SEARCH_ATTRIBUTES
            ),
        ]

    def _pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def _recorded_pid(self, name: str) -> int | None:
        path = self._pid_file(name)
        if not path.exists():
            return None
        pid = int(path.read_text().strip() or 0)
        return pid if pid and servers.pid_alive(pid) else None

    def database_url(self) -> str:
        """The database URL services should use with this stack."""
        return self._database_url()[0]

    def _database_url(self) -> tuple[str, bool]:
        """The database URL to use and whether it lives on a private cluster of this stack."""
        configured = self.settings.database_url.get_secret_value()
        admin = configured.rsplit("/", 1)[0] + "/postgres"
        if self._recorded_pid("postgres") is None and servers.postgres_ok(admin):
            return configured, False
        database = configured.rsplit("/", 1)[1] or "lookout"
        return f"postgresql://postgres@127.0.0.1:{self.settings.stack_pg_port}/{database}", True

    # --- commands ----------------------------------------------------------------------------

    def up(self) -> list[PartStatus]:
        """Start every part that is not running, wait until each is ready, then prepare them."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        report: list[PartStatus] = []

        db_url, private = self._database_url()
        if private:
            report.append(self._start(self._private_postgres()))
        else:
            report.append(
                PartStatus("postgres", _redact_db(db_url), True, None, "machine's server, not started")
            )
        asyncio.run(ensure_database(db_url))
        migrate(db_url)

        s3_spec, kafka_spec, temporal_spec = self._specs()
        report.append(self._start(s3_spec))
        s3 = create_s3_client(
            self.settings.model_copy(update={"s3_endpoint": f"127.0.0.1:{self.settings.stack_s3_port}"})
        )
        ensure_bucket(s3, KAFKA_BUCKET)  # the broker keeps its log segments here
        ensure_bucket(s3, self.settings.s3_bucket_frames)
        report.append(self._start(kafka_spec))
        report.append(self._start(temporal_spec))

        runtime = self.runtime_settings(db_url)
        asyncio.run(ensure_topics(runtime))
        asyncio.run(load_partition_logs(runtime))
        self._write_env(db_url)
        return report

    def _start(self, spec: servers.ServerSpec) -> PartStatus:
        pid = self._recorded_pid(spec.name)
        if pid is not None and spec.ready():
            return PartStatus(spec.name, spec.address, True, pid, "already running")
        if pid is None and spec.ready():
            return PartStatus(
                spec.name, spec.address, True, None, "already running, not started by this stack"
            )
        log.info("starting %s", spec.name, extra={"address": spec.address, "log": str(spec.log_path)})
        proc = spec.start(timeout=120)
        self._pid_file(spec.name).write_text(str(proc.pid))
        return PartStatus(spec.name, spec.address, True, proc.pid, "started")

    def down(self, only: list[str] | None = None) -> list[PartStatus]:
        """Stop, in reverse order, the parts this stack started (those with a pid file), or ``only`` those."""
        report: list[PartStatus] = []
        for name in ("temporal", "kafka", "s3", "postgres"):
            if only is not None and name not in only:
                continue
            path = self._pid_file(name)
            if not path.exists():
                continue
            pid = self._recorded_pid(name)
            if pid is not None:
                servers.stop_process_group(pid)
            path.unlink(missing_ok=True)
            report.append(PartStatus(name, "", False, pid, "stopped" if pid else "was not running"))
        return report

    def status(self) -> list[PartStatus]:
        db_url, private = self._database_url()
        parts: list[PartStatus] = []
        pg_pid = self._recorded_pid("postgres")
        pg_note = "private cluster" if private else "machine's server"
        parts.append(PartStatus("postgres", _redact_db(db_url), servers.postgres_ok(db_url), pg_pid, pg_note))
        for spec in self._specs():
            pid = self._recorded_pid(spec.name)
            note = "started by this stack" if pid else "not started by this stack"
            parts.append(PartStatus(spec.name, spec.address, spec.ready(), pid, note))
        ui = f"http://127.0.0.1:{self.settings.stack_temporal_ui_port}"
        parts.append(PartStatus("temporal-ui", ui, servers.http_ok(ui), None, "Temporal Web UI"))
        return parts

    def runtime_settings(self, db_url: str) -> Settings:
        """The settings a service started now should use to reach this stack."""
        s = self.settings
        return s.model_copy(
            update={
                "database_url": type(s.database_url)(db_url),
                "kafka_bootstrap": f"127.0.0.1:{s.stack_kafka_port}",
                "s3_endpoint": f"127.0.0.1:{s.stack_s3_port}",
                "temporal_address": f"127.0.0.1:{s.stack_temporal_port}",
                "temporal_ui_url": f"http://127.0.0.1:{s.stack_temporal_ui_port}",
                "kafka_fetch_max_wait_ms": S3_BROKER_FETCH_MAX_WAIT_MS,
            }
        )

    def _write_env(self, db_url: str) -> None:
        runtime = self.runtime_settings(db_url)
        lines = [
            f"LOOKOUT_DATABASE_URL={db_url}",
            f"LOOKOUT_KAFKA_BOOTSTRAP={runtime.kafka_bootstrap}",
            f"LOOKOUT_S3_ENDPOINT={runtime.s3_endpoint}",
            f"LOOKOUT_TEMPORAL_ADDRESS={runtime.temporal_address}",
            f"LOOKOUT_TEMPORAL_UI_URL={runtime.temporal_ui_url}",
            f"LOOKOUT_KAFKA_FETCH_MAX_WAIT_MS={runtime.kafka_fetch_max_wait_ms}",
        ]
        (self.data_dir / "stack.env").write_text("\n".join(lines) + "\n")


def _redact_db(url: str) -> str:
    return redact_url(url)
