"""What the benchmarks that run ``lookout up`` share: a throw-away folder, database and free ports."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from pydantic import SecretStr

from cli.api_client import LookoutClient
from cli.run import LookoutRun
from core.settings import Settings
from deploy import servers
from deploy.camera.control import TestCamera
from tests.ports import free_s3_port

ADMIN_PG_URL = os.environ.get("LOOKOUT_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def throwaway_settings(name: str, **overrides: Any) -> Iterator[Settings]:
    """Settings for a whole Lookout in a temp folder (``data_dir``; its parent holds room for a
    camera's logs), with a database of its own and every port free; the database is dropped after."""
    database = f"lookout_{name}_{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix=f"lookout-{name}-", dir="/tmp") as root:
        Path(root).chmod(0o755)  # a private Postgres cluster (runuser postgres) must reach it
        ports = {
            field: servers.free_port() for field in Settings.model_fields if field.startswith("metrics_port")
        }
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            data_dir=Path(root) / "lookout",
            database_url=SecretStr(ADMIN_PG_URL.rsplit("/", 1)[0] + "/" + database),
            stack_pg_port=servers.free_port(),
            stack_s3_port=free_s3_port(),
            stack_kafka_port=servers.free_port(),
            stack_kafka_controller_port=servers.free_port(),
            stack_temporal_port=servers.free_port(),
            stack_temporal_ui_port=servers.free_port(),
            api_port=servers.free_port(),
            **(ports | overrides),
        )
        try:
            yield settings
        finally:
            # on the machine's Postgres; a private cluster went with the stack and its folder
            if servers.postgres_ok(ADMIN_PG_URL):
                with psycopg.connect(ADMIN_PG_URL, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@contextlib.contextmanager
def running_lookout(
    name: str, mounts: list[str], **overrides: Any
) -> Iterator[tuple[LookoutRun, LookoutClient, TestCamera]]:
    """What ``lookout up`` runs, on ``throwaway_settings``, and the test camera serving ``mounts``:
    the run, a client of its API and the camera; everything stops after."""
    with throwaway_settings(name, **overrides) as settings:
        run = LookoutRun(settings)
        camera = TestCamera(log_dir=settings.data_dir.parent / "camera")
        try:
            client = run.start()
            camera.start(mounts=mounts)
            yield run, client, camera
        finally:
            camera.stop()
            run.stop()
