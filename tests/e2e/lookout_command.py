"""Running the ``lookout`` command as a user does, on a stack of its own in a temp folder."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

from deploy import servers
from tests.ports import free_s3_port

LOOKOUT = str(Path(sys.executable).parent / "lookout")


def stack_env(data_dir: Path, pg_admin_url: str, **settings: str) -> dict[str, str]:
    """The environment of a ``lookout up``/``demo`` with its own database, data folder and free ports
    (a developer's running stack is no obstacle); ``settings`` as more ``LOOKOUT_*`` variables."""
    database = f"lookout_cmd_{uuid.uuid4().hex[:8]}"
    ports = {
        name: str(servers.free_port())
        for name in ("KAFKA", "KAFKA_CONTROLLER", "TEMPORAL", "TEMPORAL_UI", "API", "CAM", "MQTT")
    }
    return {
        **os.environ,
        "LOOKOUT_DATA_DIR": str(data_dir),
        "LOOKOUT_ML_PRECISION": "fp32",  # the same model on every CPU (auto: INT8 where VNNI)
        "LOOKOUT_DATABASE_URL": pg_admin_url.rsplit("/", 1)[0] + "/" + database,
        "LOOKOUT_STACK_PG_PORT": str(servers.free_port()),
        "LOOKOUT_STACK_S3_PORT": str(free_s3_port()),
        "LOOKOUT_STACK_KAFKA_PORT": ports["KAFKA"],
        "LOOKOUT_STACK_KAFKA_CONTROLLER_PORT": ports["KAFKA_CONTROLLER"],
        "LOOKOUT_STACK_TEMPORAL_PORT": ports["TEMPORAL"],
        "LOOKOUT_STACK_TEMPORAL_UI_PORT": ports["TEMPORAL_UI"],
        "LOOKOUT_API_PORT": ports["API"],
        "LOOKOUT_DEMO_CAMERA_PORT": ports["CAM"],
        "LOOKOUT_STACK_MQTT_PORT": ports["MQTT"],
        **{
            f"LOOKOUT_METRICS_PORT_{s}": str(servers.free_port())
            for s in ("RUNNER", "ML", "RELAY", "BRIDGE", "WORKER", "WEBHOOKS", "JANITOR", "MQTT")
        },
        **{f"LOOKOUT_{name.upper()}": value for name, value in settings.items()},
    }


def database_of(env: dict[str, str]) -> str:
    return env["LOOKOUT_DATABASE_URL"].rsplit("/", 1)[1]
