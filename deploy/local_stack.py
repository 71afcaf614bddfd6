"""The embedded local stack: every infrastructure part of Lookout as a real server on 127.0.0.1.

``up`` starts what is not running yet (pid files under ``<data_dir>/run``), ``down`` stops only what
``up`` started, ``status`` reports each part's address and health. Data and logs live under the one
git-ignored ``data_dir``. The addresses in use are written to ``<data_dir>/stack.env``, which the
settings read, so services started afterwards find the stack.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from core.api_keys import Scope, create_key, key_known
from core.db import create_pool, ensure_database, migrate
from core.kafka import ensure_topics
from core.redact import redact_url
from core.sealing import generate_key, seal_stored_urls
from core.settings import Settings
from core.storage import create_s3_client, ensure_bucket
from core.temporal import SEARCH_ATTRIBUTES
from deploy import servers

log = logging.getLogger(__name__)


@dataclass
class PartStatus:
    name: str
    address: str
    healthy: bool
    pid: int | None
    note: str


class LocalStack:
    """Starts, checks and stops the parts of the embedded stack for one ``Settings``."""

    def __init__(self, settings: Settings, *, die_with_parent: bool = False) -> None:
        """``die_with_parent``: the servers this stack starts get SIGTERM from the kernel when the
        process that started them dies (``lookout up``: nothing outlives its supervisor); without it
        they run on, detached (``lookout stack up``)."""
        self.settings = settings
        self.die_with_parent = die_with_parent
        self.data_dir = settings.data_dir.resolve()
        self.run_dir = self.data_dir / "run"
        self.notices: list[str] = []  # what `up` did that the user must hear about

    # --- the parts ---------------------------------------------------------------------------

    def _private_postgres(self) -> servers.ServerSpec:
        return servers.postgres_cluster(self.data_dir / "postgres", self.settings.stack_pg_port)

    def server_specs(self) -> list[servers.ServerSpec]:
        """The stack's own servers in start order: S3, the Kafka broker, Temporal, and Mosquitto when
        MQTT is enabled."""
        s = self.settings
        mqtt = []
        if s.mqtt_enabled:
            mqtt = [servers.mosquitto_server(self.data_dir / "mqtt", s.stack_mqtt_port, s.mqtt_username,
                                             self.mqtt_password())]  # fmt: skip
        return [
            servers.s3_server(
                self.data_dir / "s3", s.stack_s3_port, s.s3_access_key, s.s3_secret_key.get_secret_value()
            ),
            servers.kafka_broker(
                self.data_dir / "kafka",
                s.stack_kafka_port,
                controller_port=s.stack_kafka_controller_port,
                heap_mb=s.stack_kafka_heap_mb,
                max_message_bytes=s.kafka_max_request_size,
            ),
            servers.temporal_dev_server(
                self.data_dir / "temporal", s.stack_temporal_port, s.stack_temporal_ui_port, SEARCH_ATTRIBUTES
            ),
            *mqtt,
        ]

    @property
    def mqtt_password_path(self) -> Path:
        """The MQTT password the stack's Mosquitto and ``lookout-mqtt`` share, made on first use."""
        return self.data_dir / "mqtt-password"

    def mqtt_password(self) -> str:
        configured = self.settings.mqtt_secret()
        if configured:
            return configured
        if not self.mqtt_password_path.exists():
            _write_private(self.mqtt_password_path, secrets.token_urlsafe(24))
        return self.mqtt_password_path.read_text().strip()

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
        self._ensure_secret_key()
        asyncio.run(self._prepare_database(db_url))

        for spec in self.server_specs():
            report.append(self._start(spec))
            if spec.name == "s3":
                self.prepare_s3()

        runtime = self.runtime_settings(db_url)
        for change in asyncio.run(ensure_topics(runtime)):
            log.info("topics reconciled", extra={"change": change})
            self.notices.append(f"kafka topic {change}")
        self._write_env(db_url)
        return report

    @property
    def secret_key_path(self) -> Path:
        """The key that seals camera URLs, made by ``up`` unless one is configured."""
        return self.data_dir / "secret-key"

    @property
    def api_key_path(self) -> Path:
        """The first admin API key's token, which the ``lookout`` command and the demo use."""
        return self.data_dir / "api-key"

    def _ensure_secret_key(self) -> None:
        s = self.settings
        if s.secret_key.get_secret_value() or s.secret_key_file is not None or self.secret_key_path.exists():
            return
        _write_private(self.secret_key_path, generate_key())
        self.notices.append(f"made the key that seals camera URLs: {self.secret_key_path} (keep it private)")

    async def _prepare_database(self, db_url: str) -> None:
        """Seal the camera URLs stored in clear (earlier releases) and make sure an admin key exists."""
        runtime = self.runtime_settings(db_url)
        pool = await create_pool(runtime.model_copy(update={"db_pool_min": 1, "db_pool_max": 2}))
        try:
            if sealed := await seal_stored_urls(pool, runtime):
                log.info("camera URLs sealed", extra={"rows": sealed})
            path = self.api_key_path
            if path.exists():
                token = path.read_text().strip()
                if not await key_known(pool, token):  # a fresh database: the key file still stands
                    await create_key(pool, name="embedded stack", scope=Scope.ADMIN, token=token)
            else:
                _key, token = await create_key(pool, name="embedded stack", scope=Scope.ADMIN)
                _write_private(path, token)
                self.notices.append(f"made the first admin API key: {path} (the lookout command uses it)")
        finally:
            await pool.close()

    def prepare_s3(self) -> None:
        """Create the bucket of the annotated frames."""
        s3 = create_s3_client(
            self.settings.model_copy(update={"s3_endpoint": f"127.0.0.1:{self.settings.stack_s3_port}"})
        )
        ensure_bucket(s3, self.settings.s3_bucket_frames)

    def start_part(self, name: str, *, die_with_parent: bool | None = None) -> PartStatus:
        """Start one of the stack's servers (``s3``, ``kafka``, ``temporal``) unless it is running;
        ``die_with_parent`` (default: the stack's) ties it to the calling thread's process."""
        spec = next(spec for spec in self.server_specs() if spec.name == name)
        return self._start(spec, die_with_parent=die_with_parent)

    def recorded_pid(self, name: str) -> int | None:
        """The pid of a part this stack started and that is still alive."""
        return self._recorded_pid(name)

    def record_restart(self, name: str) -> int:
        """Count a restart of ``name`` by a supervisor (``stack status`` shows it); returns the count."""
        counts = self.restart_counts()
        counts[name] = counts.get(name, 0) + 1
        (self.run_dir / "restarts.json").write_text(json.dumps(counts))
        return counts[name]

    def restart_counts(self) -> dict[str, int]:
        path = self.run_dir / "restarts.json"
        counts: dict[str, int] = json.loads(path.read_text()) if path.exists() else {}
        return counts

    def _start(self, spec: servers.ServerSpec, *, die_with_parent: bool | None = None) -> PartStatus:
        pid = self._recorded_pid(spec.name)
        if pid is not None and spec.ready():
            return PartStatus(spec.name, spec.address, True, pid, "already running")
        if pid is None and spec.ready():
            return PartStatus(
                spec.name, spec.address, True, None, "already running, not started by this stack"
            )
        log.info("starting %s", spec.name, extra={"address": spec.address, "log": str(spec.log_path)})
        tied = self.die_with_parent if die_with_parent is None else die_with_parent
        proc = spec.start(timeout=120, die_with_parent=tied)
        self._pid_file(spec.name).write_text(str(proc.pid))
        return PartStatus(spec.name, spec.address, True, proc.pid, "started")

    def down(self, only: list[str] | None = None) -> list[PartStatus]:
        """Stop the parts this stack started (those with a pid file), or ``only`` those: the servers
        together, then a private Postgres cluster (the others may still write to it as they stop)."""
        report: list[PartStatus] = []
        for stage in (("mqtt", "temporal", "kafka", "s3"), ("postgres",)):
            parts = [
                (name, self._recorded_pid(name))
                for name in stage
                if (only is None or name in only) and self._pid_file(name).exists()
            ]
            servers.stop_process_groups([pid for _, pid in parts if pid is not None])
            for name, pid in parts:
                self._pid_file(name).unlink(missing_ok=True)
                report.append(PartStatus(name, "", False, pid, "stopped" if pid else "was not running"))
        return report

    def status(self) -> list[PartStatus]:
        db_url, private = self._database_url()
        parts: list[PartStatus] = []
        pg_pid = self._recorded_pid("postgres")
        pg_note = "private cluster" if private else "machine's server"
        parts.append(PartStatus("postgres", _redact_db(db_url), servers.postgres_ok(db_url), pg_pid, pg_note))
        restarts = self.restart_counts()
        for spec in self.server_specs():
            pid = self._recorded_pid(spec.name)
            note = "started by this stack" if pid else "not started by this stack"
            if restarts.get(spec.name):
                note += f", restarted {restarts[spec.name]} time(s)"
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
                "s3_compact_url": servers.seaweed_compact_url(s.stack_s3_port),
                **self._secret_key_setting(),
                **self._mqtt_settings(),
            }
        )

    def _mqtt_settings(self) -> dict[str, object]:
        s = self.settings
        if not s.mqtt_enabled:
            return {}
        found: dict[str, object] = {"mqtt_host": "127.0.0.1", "mqtt_port": s.stack_mqtt_port}
        if not s.mqtt_secret():
            found["mqtt_password_file"] = self.mqtt_password_path
        return found

    def _secret_key_setting(self) -> dict[str, Path]:
        s = self.settings
        if s.secret_key.get_secret_value() or s.secret_key_file is not None:
            return {}
        return {"secret_key_file": self.secret_key_path}

    def _write_env(self, db_url: str) -> None:
        runtime = self.runtime_settings(db_url)
        lines = [
            f"LOOKOUT_DATABASE_URL={db_url}",
            f"LOOKOUT_KAFKA_BOOTSTRAP={runtime.kafka_bootstrap}",
            f"LOOKOUT_S3_ENDPOINT={runtime.s3_endpoint}",
            f"LOOKOUT_TEMPORAL_ADDRESS={runtime.temporal_address}",
            f"LOOKOUT_TEMPORAL_UI_URL={runtime.temporal_ui_url}",
            f"LOOKOUT_S3_COMPACT_URL={runtime.s3_compact_url}",
        ]
        if runtime.secret_key_file is not None:
            lines.append(f"LOOKOUT_SECRET_KEY_FILE={runtime.secret_key_file}")
        if runtime.mqtt_enabled:
            lines += [f"LOOKOUT_MQTT_HOST={runtime.mqtt_host}", f"LOOKOUT_MQTT_PORT={runtime.mqtt_port}"]
            if runtime.mqtt_password_file is not None:
                lines.append(f"LOOKOUT_MQTT_PASSWORD_FILE={runtime.mqtt_password_file}")
        (self.data_dir / "stack.env").write_text("\n".join(lines) + "\n")


def _redact_db(url: str) -> str:
    return redact_url(url)


def _write_private(path: Path, text: str) -> None:
    """Write a secret readable by its owner only (created so, never widened first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text + "\n")
